"""Selection: label-blind greedy rankings of the archive and the coverage of their prefixes."""

from .greedy import Ranking, Settings, batch_greedy, choose_seeds, exact_greedy, rank
from .rules import Rules
from .shard import Shard
from .stage import run_select

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
