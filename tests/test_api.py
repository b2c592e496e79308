"""The Python API: the README's example runs as written; tables join the manifest; bad names are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_and_tables_join_the_manifest(ray_local, tmp_path, monkeypatch, capsys) -> None:
    import enrich_dist

    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "images repeat a kept image above 0.9" in out and "embeddings" in out

    r = enrich_dist.open_run("runs/api/run")
    assert "selection" in repr(r)
    manifest = r.manifest().set_index("image_id")
    ranking = r.ranking(replicate=None)
    assert sorted(set(ranking["replicate"])) == [0, 1] and len(ranking) == 2 * len(manifest)
    for row in ranking.head(30).itertuples():
        assert row.uri == manifest.loc[row.image_id, "uri"]
    assert list(r.ranking(method="random")["rank"]) == list(range(len(manifest)))
    drop = r.duplicates(0.9, "remove")
    kept = set(manifest.index) - set(drop["image_id"])
    assert set(drop["kept_image_id"]) <= kept
    # the selection stage's removal list keeps whichever near-duplicate the ENRICH ranking takes first
    by_rank = r.duplicates(0.9, "remove", keep="ranking")
    first = r.ranking()["image_id"].iloc[0]
    assert len(by_rank) and first not in set(by_rank["image_id"])  # the ranking's first image is always kept
    assert set(by_rank["kept_image_id"]).isdisjoint(by_rank["image_id"])
    assert r.dir.read_json("selection/selection.json")["remove_by_ranking"]["0.9"] == len(by_rank)
    with pytest.raises(ValueError, match="keep is 'ranking' or None"):
        r.duplicates(0.9, "remove", keep="central")
    groups = r.duplicates(0.9)
    assert set(groups.columns) >= {"image_id", "group_id", "group_size", "uri"}
    summary = r.summary()
    assert summary["duplicates"]["thresholds"]["0.9"]["remove"] == len(drop)
    neighbors = r.neighbors()
    assert len(neighbors) == len(manifest) and "nn_ids" in neighbors
    with pytest.warns(DeprecationWarning, match="renamed neighbors"):
        assert r.neighbours().equals(neighbors)  # the earlier spelling, for one release
    assert r.dataset("edges").count() == summary["edges"]["pairs"]
    import pandas as pd  # a stage folder reads whole: no side file among its shards

    assert pd.read_parquet("runs/api/run/manifest").shape == r.manifest().shape
    assert len(pd.read_parquet("runs/api/run/embeddings")) == r.dataset("embeddings").count()
    with pytest.raises(ValueError, match="dataset must be one of"):
        r.dataset("ranking")
    with pytest.raises(FileNotFoundError, match="--duplicate-thresholds"):
        r.duplicates(0.95)
    with pytest.raises(ValueError, match="no replicate 7"):
        r.ranking(replicate=7)
    with pytest.raises(ValueError, match="unknown config key"):
        enrich_dist.run("x", "y", selct={"mode": "exact"})


def test_stage_folders_read_whole_and_format_1_side_files_are_found(tmp_path) -> None:
    """A stage folder holds only its shards; side files of format-1 run dirs are still found where they were."""
    import pandas as pd
    import pyarrow as pa

    from enrich_dist import schema
    from enrich_dist.storage import RunDir

    run = RunDir(str(tmp_path / "run"))
    table = pa.table({"image_id": pa.array([1, 2], pa.int64())})
    run.write_table(f"{schema.MANIFEST_DIR}/part-00000.parquet", table)
    run.write_table(schema.MANIFEST_FILES, pa.table({"uri": ["a", "b", "c"]}))
    run.mark_done(schema.MANIFEST_DIR, {})
    assert list(pd.read_parquet(run.path(schema.MANIFEST_DIR)).columns) == ["image_id"]
    assert schema.located(run, schema.MANIFEST_FILES) == schema.MANIFEST_FILES

    old = RunDir(str(tmp_path / "old"))
    old.write_table("manifest/files.parquet", pa.table({"uri": ["a"]}))
    old.write_json("embeddings/embedder.json", {"embedder": "vae"})
    assert schema.located(old, schema.MANIFEST_FILES) == "manifest/files.parquet"
    assert schema.located(old, schema.EMBEDDER_IDENTITY) == "embeddings/embedder.json"
    assert schema.located(old, schema.EMBED_ERRORS_DIR) == schema.EMBED_ERRORS_DIR  # in neither place
