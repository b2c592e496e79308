"""The Python API: run the pipeline, and read a run dir's artifacts as pandas DataFrames or Ray Datasets.

    import enrich_dist
    enrich_dist.run("archive/", "runs/a", select={"mode": "exact"}, evaluate={"replicates": 3})
    r = enrich_dist.open_run("runs/a")
    r.ranking(replicate=0).head()        # rank, image_id, is_seed, score, uri, frame, patient_id, clip_id
    r.duplicates(0.9, "remove")          # the near-duplicates to drop, with the kept image they repeat

Every table joins the manifest's ``uri``, ``frame``, ``patient_id`` and ``clip_id`` on ``image_id``.
"""

from __future__ import annotations

import posixpath
import warnings
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from .config import RunConfig
from .schema import (
    EDGES_DIR,
    EMBEDDINGS_DIR,
    LEAKAGE_PATH,
    MANIFEST_DIR,
    NEIGHBORS_DIR,
    RANDOM_RANKING_PATH,
    RANKED_REMOVAL_DIR,
    RANKING_PATH,
    SELECTION_DIR,
    SIMILARITY_DIR,
    SIMILARITY_SUMMARY,
    threshold_folder,
)
from .storage import RunDir

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

DATASETS = {
    "manifest": MANIFEST_DIR,
    "embeddings": EMBEDDINGS_DIR,
    "neighbors": NEIGHBORS_DIR,
    "edges": EDGES_DIR,
}
JOINED = ["uri", "frame", "patient_id", "clip_id"]


def run(input: str, output: str, storage_options: dict | None = None, **settings: Any) -> dict:  # noqa: A002
    """Run every stage on ``input`` into ``output``; ``settings`` are config sections as dicts (see config.py).

    ``enrich_dist.run(src, out, similarity={"top_k": 5}, num_cpus=2)``. Returns the stats per stage.
    """
    from .pipeline import STAGES, run_stages

    cfg = RunConfig.from_dict({"input": input, "output": output, **settings})
    return run_stages(cfg, STAGES, storage_options)


def open_run(uri: str, storage_options: dict | None = None) -> Run:
    """A run dir (local path or s3://...) to read."""
    return Run(RunDir(uri, storage_options))


class Run:
    """Read access to one run dir's artifacts."""

    def __init__(self, run: RunDir):
        self.dir = run

    def __repr__(self) -> str:
        done = [s for s in ("manifest", "encoder", "embeddings", "similarity", "selection", "evaluation", "report")
                if self.dir.is_done(s)]
        return f"Run({self.dir.uri!r}, done: {', '.join(done) or 'nothing'})"

    def _manifest_table(self) -> pa.Table:
        self.dir.require(MANIFEST_DIR, "manifest")
        return self.dir.read_table(MANIFEST_DIR)

    def _joined(self, table: pa.Table) -> pd.DataFrame:
        manifest = self._manifest_table().select(["image_id", *JOINED]).to_pandas()
        return table.to_pandas().merge(manifest, on="image_id", how="left")

    def manifest(self) -> pd.DataFrame:
        """One row per image (``status`` ok/error with the reason), sorted by ``image_id``."""
        return self._manifest_table().sort_by("image_id").to_pandas()

    def ranking(self, replicate: int | None = 0, method: str = "enrich") -> pd.DataFrame:
        """The ranking of ``replicate`` (None: every replicate) by ``rank``; ``method`` "random" for the baseline."""
        self.dir.require(SELECTION_DIR, "select")
        path = {"enrich": RANKING_PATH, "random": RANDOM_RANKING_PATH}.get(method)
        if path is None:
            raise ValueError(f"method must be 'enrich' or 'random', got {method!r}")
        table = self.dir.read_table(path)
        if replicate is not None:
            table = table.filter(pc.equal(table.column("replicate"), replicate))
            if not table.num_rows:
                raise ValueError(f"no replicate {replicate} in {self.dir.uri_of(path)}")
        return self._joined(table).sort_values(["replicate", "rank"], ignore_index=True)

    def neighbors(self) -> pd.DataFrame:
        """Each image's top-k most similar images (``nn_ids``, ``nn_sims``, best first) and threshold counts."""
        self.dir.require(SIMILARITY_DIR, "similarity")
        return self._joined(self.dir.read_table(NEIGHBORS_DIR)).sort_values("image_id", ignore_index=True)

    def neighbours(self) -> pd.DataFrame:
        """The earlier spelling of :meth:`neighbors`, kept for one release."""
        warnings.warn("open_run(...).neighbours() is renamed neighbors()", DeprecationWarning, stacklevel=2)
        return self.neighbors()

    def duplicates(self, t: float = 0.9, what: str = "groups", keep: str | None = None) -> pd.DataFrame:
        """Near-duplicates above ``t``: ``groups`` (connected components), ``remove`` (images to drop) or ``leakage``.

        ``keep="ranking"`` with ``remove``: the selection stage's list, which keeps whichever near-duplicate the
        ENRICH ranking (first replicate) takes first; otherwise the similarity stage's (``--keep`` policy).
        """
        self.dir.require(SIMILARITY_DIR, "similarity")
        if keep == "ranking":
            if what != "remove":
                raise ValueError("keep='ranking' belongs to what='remove'")
            self.dir.require(SELECTION_DIR, "select")
            name = threshold_folder(t).split("/", 1)[1]
            path = posixpath.join(RANKED_REMOVAL_DIR, f"{name}.parquet")
            if not self.dir.exists(path):
                raise FileNotFoundError(f"no {self.dir.uri_of(path)}: no duplicates at {t:g} (or no complete edge list)")
            return self._joined(self.dir.read_table(path)).sort_values("image_id", ignore_index=True)
        if keep is not None:
            raise ValueError(f"keep is 'ranking' or None (the similarity stage's --keep policy), got {keep!r}")
        if what == "leakage":
            if not self.dir.exists(LEAKAGE_PATH):
                raise FileNotFoundError(f"no {self.dir.uri_of(LEAKAGE_PATH)}: the manifest has no splits or patients")
            return self.dir.read_table(LEAKAGE_PATH).to_pandas()
        if what not in ("groups", "remove"):
            raise ValueError(f"what must be 'groups', 'remove' or 'leakage', got {what!r}")
        path = posixpath.join(threshold_folder(t), f"{what}.parquet")
        if not self.dir.exists(path):
            kept = (self.summary().get("duplicates") or {}).get("thresholds", {})
            raise FileNotFoundError(
                f"no {self.dir.uri_of(path)}: duplicates were written for thresholds {sorted(kept) or 'none'}; "
                "rerun `enrich similarity` with --duplicate-thresholds"
            )
        return self._joined(self.dir.read_table(path)).sort_values("image_id", ignore_index=True)

    def summary(self) -> dict:
        """``similarity/summary.json``: histogram, threshold counts, sibling recall, edges, duplicates."""
        self.dir.require(SIMILARITY_DIR, "similarity")
        return self.dir.read_json(SIMILARITY_SUMMARY)

    def dataset(self, name: str) -> ray.data.Dataset:
        """A stage's shards as a Ray Dataset (``manifest``, ``embeddings``, ``neighbors``, ``edges``)."""
        import ray.data

        from .runtime import quiet_ray_data

        quiet_ray_data()

        if name not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
        shards = list(self.dir.shards(DATASETS[name]).values())
        if not shards:
            raise FileNotFoundError(f"no shards under {self.dir.uri_of(DATASETS[name])}")
        filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(self.dir.fs))
        return ray.data.read_parquet([self.dir.path(p) for p in shards], filesystem=filesystem)
