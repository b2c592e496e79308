"""Run a GPU check script the way the GPU machine would: with the packages it lacks blocked from import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_BLOCKER = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")
sys.meta_path.insert(0, Block())
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def run_blocked(
    script: Path, absent: tuple[str, ...], *args: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``script args`` in a subprocess where importing any of ``absent`` (or anything under them) fails."""
    code = _BLOCKER.format(absent=absent, script=str(script))
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def is_measure(value) -> bool:
    """A time or rate as the scripts record it: a non-negative number (0.0 once rounded, inf for a rate
    over a time that rounded to 0). Tests check measurements for presence and type, never for speed."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
