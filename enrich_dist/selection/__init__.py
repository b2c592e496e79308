"""Selection: label-blind greedy rankings of the archive and the coverage of their prefixes."""

from .greedy import Ranking, batch_greedy, choose_seeds, exact_greedy
from .stage import run_select

__all__ = ["Ranking", "batch_greedy", "choose_seeds", "exact_greedy", "run_select"]
