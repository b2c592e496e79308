"""The package's layers, read from its source: imports run downward only, no private name crosses a unit, and
only the executor (with storage) touches a stage's done marker."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "enrich_dist"
FOUNDATIONS = {"config", "errors", "schema", "storage", "runtime", "fingerprints", "idlists", "invariants",
               "executor", "stages", "pairgraph", "imaging"}
STAGES = {"manifest", "encoder", "embed", "similarity", "selection", "evaluation", "report", "incremental", "export",
          "datasets"}
TOP = {"pipeline", "api", "cli", "sizing", "__init__", "__main__"}
# the embed stage runs the encoder package's networks (its model code is a library to embed with)
ALLOWED_ACROSS_STAGES = {("embed", "encoder")}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[str, set[tuple[str, str]]]:
    """unit -> {(imported unit, imported name)} for every relative import in the package."""
    out: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    unit = _unit(target if node.module else f"{target}.{alias.name}")
                    if unit != _unit(module):
                        out[_unit(module)].add((unit, alias.name))
    return out


def test_every_unit_has_a_layer():
    units = {_unit(".".join(("enrich_dist", *p.relative_to(PACKAGE).with_suffix("").parts))) for p in PACKAGE.rglob("*.py")}
    assert units <= FOUNDATIONS | STAGES | TOP | {"__version__"}, units - FOUNDATIONS - STAGES - TOP


def test_imports_run_downward():
    """foundations <- stages <- pipeline/api/cli: a foundation imports foundations only, a stage no other stage."""
    bad = []
    for unit, targets in _imports().items():
        for target, _ in targets:
            if unit in FOUNDATIONS and target not in FOUNDATIONS:
                bad.append(f"foundation {unit} imports {target}")
            if unit in STAGES and target in STAGES and (unit, target) not in ALLOWED_ACROSS_STAGES:
                bad.append(f"stage {unit} imports stage {target}")
            if target in TOP and unit not in TOP:
                bad.append(f"{unit} imports {target} (the top layer)")
    assert not bad, bad


def test_no_private_name_crosses_a_unit():
    crossing = [(u, t, n) for u, targets in _imports().items() for t, n in targets if n.startswith("_")
                and n != "__version__"]
    assert not crossing, crossing


def test_only_the_executor_touches_done_markers():
    """Stages compute; the executor alone marks a stage done, clears it, or reads its marker (storage implements)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("executor.py", "storage.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("mark_done", "clear_done"):
                offenders.append(f"{path.relative_to(PACKAGE)}: {node.attr}")
            if isinstance(node, ast.Name) and node.id == "DONE_NAME":
                offenders.append(f"{path.relative_to(PACKAGE)}: DONE_NAME")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "/_SUCCESS" in node.value:
                offenders.append(f"{path.relative_to(PACKAGE)}: {node.value!r}")
    assert not offenders, offenders


def test_registry_declares_every_stage_command():
    """One record per stage; the CLI's stage commands are the registry's, and each entry point resolves."""
    from enrich_dist.cli import build_parser
    from enrich_dist.executor import resolve
    from enrich_dist.stages import PIPELINE, REGISTRY

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public API
    assert {s.name for s in PIPELINE} <= commands
    for record in REGISTRY.values():
        for entry in (record.compute, record.check, record.when_done, record.marker, record.cleanup):
            if entry:
                assert callable(resolve(entry)), entry
        assert set(record.needs) <= set(REGISTRY)
