"""Selection: label-blind greedy rankings of the archive and the coverage of their prefixes."""

from .greedy import Ranking, Settings, batch_greedy, choose_seeds, exact_greedy, rank
from .rules import Rules
from .shard import Shard

__all__ = [
    "Ranking",
    "Rules",
    "Settings",
    "Shard",
    "batch_greedy",
    "choose_seeds",
    "exact_greedy",
    "rank",
    "run_select",
]


def __getattr__(name: str):
    """``run_select`` on first use: the stage needs Ray and pyarrow, the rankings themselves only numpy."""
    if name == "run_select":
        from .stage import run_select

        return run_select
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
