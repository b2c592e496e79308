"""Sizes (count vs fraction), config files and overrides."""

from __future__ import annotations

import json

import pytest

from enrich_dist.config import RunConfig, load_config, parse_list, parse_size, resolve_size


@pytest.mark.parametrize(
    "value, expected",
    [("5000", 5000), (5000, 5000), ("0.44", 0.44), (0.44, 0.44), ("1.0", 1.0), ("1", 1), (" 7 ", 7)],
)
def test_parse_size(value, expected):
    out = parse_size(value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value", ["-3", "1.5", "0.0", "abc", -1, True])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_resolve_size():
    assert resolve_size("0.5", 10) == 5
    assert resolve_size(0.001, 10) == 1  # never rounds a fraction down to nothing
    assert resolve_size(50, 10) == 10
    assert resolve_size(0.5, 0) == 0
    assert resolve_size("1.0", 7) == 7


def test_parse_list():
    assert parse_list("0.5,0.7, 0.9") == [0.5, 0.7, 0.9]
    assert parse_list([1, 2], int) == [1, 2]


def test_config_file_yaml_and_json(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("encoder:\n  epochs: 3\nselect:\n  budgets: [0.1, 0.2]\n")
    cfg = load_config(str(y))
    assert cfg.encoder.epochs == 3 and cfg.select.budgets == (0.1, 0.2)
    j = tmp_path / "c.json"
    j.write_text(json.dumps(RunConfig().to_dict()))
    assert load_config(str(j)).to_dict() == RunConfig().to_dict()


def test_config_unknown_keys_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoder:\n  epoch: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*'epoch'"):
        load_config(str(bad))
    bad.write_text("encodr: {}\n")
    with pytest.raises(ValueError, match="encodr"):
        load_config(str(bad))


def test_version(capsys):
    from enrich_dist import __version__
    from enrich_dist.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"enrich {__version__}"
