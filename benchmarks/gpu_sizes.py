"""What the GPU check scripts share: results written whole after every step, sizes run within a time budget."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable


def write_json(path: str, result: dict) -> None:
    """``result`` at ``path``, replaced whole (a cut-short run leaves what it measured, never half a file)."""
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    os.replace(path + ".tmp", path)


def run_sizes(
    sizes: tuple[int, ...],
    measure: Callable[[int], dict],
    project: Callable[[dict, int], float],
    how: str,
    started: float,
    budget: float,
    record: Callable[[dict], None],
) -> None:
    """``measure(n)`` for each size in turn, unless ``project(last measured entry, n)`` seconds would end past
    ``budget`` seconds after ``started``; then the entry gives the projection, labelled ``how``. ``record``
    gets every entry as it is made.
    """
    last: dict | None = None
    for n in sizes:
        if last is not None:
            projected = project(last, n)
            if time.perf_counter() - started + projected > budget:
                record(
                    {
                        "n": n,
                        "not_run": "projected past --budget-seconds",
                        "projected_seconds": round(projected, 1),
                        "projection": how,
                    }
                )
                continue
        last = measure(n)
        print(json.dumps(last), flush=True)
        record(last)


def size_arguments(description: str, name: str, sizes: tuple[int, ...], budget: float) -> argparse.ArgumentParser:
    """The options every size-budgeted check takes: where to write ``name``, the sizes and clustered data."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help=f"folder for {name}")
    parser.add_argument("--sizes", default=",".join(map(str, sizes)))
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--images-per-cluster", type=int, default=500)
    parser.add_argument("--spread", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-seconds", type=float, default=budget)
    return parser


def begin(args: argparse.Namespace, dry_sizes: tuple[int, ...]) -> tuple[tuple[int, ...], dict]:
    """The sizes to run (``dry_sizes`` with ``--dry-run``) and the result record; makes ``--out``."""
    os.makedirs(args.out, exist_ok=True)
    sizes = dry_sizes if args.dry_run else tuple(int(s) for s in args.sizes.split(","))
    return sizes, {"dry_run": args.dry_run, "sizes": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
