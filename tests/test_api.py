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
    groups = r.duplicates(0.9)
    assert set(groups.columns) >= {"image_id", "group_id", "group_size", "uri"}
    summary = r.summary()
    assert summary["duplicates"]["thresholds"]["0.9"]["remove"] == len(drop)
    neighbours = r.neighbours()
    assert len(neighbours) == len(manifest) and "nn_ids" in neighbours
    assert r.dataset("edges").count() == summary["edges"]["pairs"]
    with pytest.raises(ValueError, match="dataset must be one of"):
        r.dataset("ranking")
    with pytest.raises(FileNotFoundError, match="--duplicate-thresholds"):
        r.duplicates(0.95)
    with pytest.raises(ValueError, match="no replicate 7"):
        r.ranking(replicate=7)
    with pytest.raises(ValueError, match="unknown config key"):
        enrich_dist.run("x", "y", selct={"mode": "exact"})
