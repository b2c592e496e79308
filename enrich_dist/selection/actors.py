"""The distributed candidate store: contiguous row ranges held by Ray actors that read their own rows.

Each actor reads its embeddings (and top-k lists) from the run dir itself; per round the driver
receives only each shard's lowest candidates, and sends back the picked rows with their vectors.
"""

from __future__ import annotations

import numpy as np
import ray

from ..runtime import cluster_resources
from ..storage import RunDir
from .inputs import Part, read_neighbors, read_vectors
from .shard import CandidateState, Fetch, Shard, merge_fetches


@ray.remote(num_cpus=1)
class ShardActor:
    """One :class:`~.shard.Shard` over the rows ``[low, high)`` of the id-sorted embeddings."""

    def __init__(
        self,
        run: RunDir,
        parts: list[Part],
        ids: np.ndarray,
        low: int,
        high: int,
        aggregate: str,
        groups: np.ndarray | None,
        n_groups: int,
        device: str | None = None,
    ):
        self.ids, self.low, self.high = ids, low, high
        vectors = read_vectors(run, parts, ids[low:high])
        self.shard = Shard(np.arange(low, high), vectors, aggregate, groups, n_groups, device)

    def describe(self) -> tuple[float, int]:
        """Largest row norm and checksum of this shard."""
        return self.shard.max_norm, self.shard.checksum()

    def enable_pruning(self, run: RunDir, parts: list[Part], norm_bound: float) -> bool:
        """Read this shard's top-k lists and prune with them; False if unusable."""
        lists = read_neighbors(run, parts, self.ids, self.ids[self.low : self.high])
        return lists is not None and self.shard.enable_pruning(*lists, norm_bound, len(self.ids))

    def disable_pruning(self) -> None:
        """Stop pruning (another shard found the lists stale)."""
        self.shard.disable_pruning()

    def call(self, method: str, *args: object) -> object:
        """Run one :class:`~.shard.Shard` method."""
        return getattr(self.shard, method)(*args)


class ActorStore:
    """The :class:`~.greedy.Store` protocol over shard actors (``bounds``: each actor's first row, then n)."""

    def __init__(self, actors: list, bounds: np.ndarray):
        self.actors = actors
        self.bounds = np.asarray(bounds, dtype=np.int64)

    def close(self) -> None:
        """Stop the actors."""
        for actor in self.actors:
            ray.kill(actor)

    def enable_bounds(self, cell_size: int, seed: int) -> int:
        """Cell bounds in every shard (each over its own rows); the cells in all."""
        return sum(self._all("enable_bounds", cell_size, seed))

    def products(self) -> tuple[int, int]:
        """Products the folds computed and skipped, over every shard, in the current ranking."""
        counts = self._all("products")
        return sum(c for c, _ in counts), sum(s for _, s in counts)

    def _all(self, method: str, *args: object) -> list:
        """Call ``method`` on every shard (array arguments shipped once) and wait."""
        refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]
        return ray.get([actor.call.remote(method, *refs) for actor in self.actors])

    def _owners(self, rows: np.ndarray) -> np.ndarray:
        """Index of the shard holding each row."""
        return np.searchsorted(self.bounds, rows, side="right") - 1

    def start(
        self,
        rows: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        sums: np.ndarray | None = None,
        n_chosen: int = 0,
    ) -> None:
        """Begin a ranking in every shard, fresh or from saved candidates."""
        if rows is None:
            self._all("start")
            return
        owner = self._owners(rows)
        refs = []
        for k, actor in enumerate(self.actors):
            mine = owner == k
            part_sums = sums[mine] if sums is not None else None
            refs.append(actor.call.remote("start", rows[mine], scores[mine], part_sums, n_chosen))
        ray.get(refs)

    def lowest(self, m: int, with_vectors: bool = False, block: np.ndarray | None = None) -> list[Fetch]:
        """Per group, the ``m`` lowest eligible candidates over all shards."""
        return merge_fetches(self._all("lowest", m, with_vectors, block), m)

    def lift(self) -> None:
        """Unblock every candidate in every shard."""
        self._all("lift")

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Mark ``rows`` chosen in their shards; returns their vectors in ``rows`` order."""
        owner = self._owners(rows)
        busy = np.unique(owner)
        parts = ray.get([self.actors[k].call.remote("take", rows[owner == k]) for k in busy])
        out = np.empty((len(rows), parts[0].shape[1]), dtype=np.float32)
        for k, vectors in zip(busy, parts, strict=True):
            out[owner == k] = vectors
        return out

    def update(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Fold the newly chosen rows into every shard's scores."""
        self._all("update", rows, vectors)

    def state(self) -> CandidateState:
        """Every shard's candidates and scores, in row order."""
        parts = self._all("state")
        sums = [p.sums for p in parts]
        return CandidateState(
            np.concatenate([p.rows for p in parts]),
            np.concatenate([p.scores for p in parts]),
            None if sums[0] is None else np.concatenate(sums),
        )


def start_actors(
    run: RunDir,
    parts: list[Part],
    ids: np.ndarray,
    workers: int,
    aggregate: str,
    groups: np.ndarray | None,
    n_groups: int,
    lists: list[Part] | None,
    device: str | None = None,
    gpus: float = 0,
) -> tuple[ActorStore, bool, int]:
    """Shard actors over ``workers`` row ranges of ``ids``: the store, whether it prunes, the embeddings checksum.

    ``groups`` (one balance group per row, or None) and ``lists`` (the neighbor shards, or None)
    are read by each actor for its own rows. With ``device`` each actor folds on it, holding ``gpus``.
    """
    n = len(ids)
    bounds = np.linspace(0, n, workers + 1).round().astype(np.int64)
    per_actor = min(1.0, max(1, cluster_resources().cpus) / workers)
    ids_ref = ray.put(ids)
    actors = [
        ShardActor.options(num_cpus=per_actor, num_gpus=gpus).remote(
            run,
            parts,
            ids_ref,
            int(low),
            int(high),
            aggregate,
            None if groups is None else groups[low:high],
            n_groups,
            device,
        )
        for low, high in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    store = ActorStore(actors, bounds)
    try:
        described = ray.get([a.describe.remote() for a in actors])
        pruning = False
        if lists is not None:
            norm_bound = max(norm for norm, _ in described)
            pruning = all(ray.get([a.enable_pruning.remote(run, lists, norm_bound) for a in actors]))
            if not pruning:
                ray.get([a.disable_pruning.remote() for a in actors])
    except BaseException:
        store.close()
        raise
    return store, pruning, sum(c for _, c in described) % 2**64
