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


def test_choices_match_the_modules_that_use_them():
    """The validator's choice lists are the ones the stages accept (no drift between the two)."""
    from enrich_dist import embed, pairgraph
    from enrich_dist.config import CHOICES
    from enrich_dist.evaluation import stage as evaluation_stage
    from enrich_dist.report import stage as report_stage
    from enrich_dist.selection import cells, covering, greedy, shard
    from enrich_dist.similarity import stage as similarity_stage

    assert CHOICES["embed", "embedder"] == embed.EMBEDDERS
    assert CHOICES["similarity", "mode"] == similarity_stage.MODES
    assert CHOICES["similarity", "device"] == similarity_stage.DEVICES
    assert CHOICES["similarity", "keep"] == pairgraph.KEEP_POLICIES
    assert CHOICES["select", "mode"] == (*greedy.MODES, *covering.COVER_MODES, cells.CELLS_MODE)
    assert CHOICES["select", "aggregate"] == shard.AGGREGATES
    assert set(CHOICES["evaluate", "task"]) == set(evaluation_stage.TASKS)
    assert CHOICES["report", "images"] == report_stage.REPORT_IMAGES


@pytest.mark.parametrize(
    "text, named",
    [
        ("encoder:\n  epochs: abc\n", r"encoder\.epochs must be an integer, got 'abc'"),
        ("select:\n  mode: fast\n", r"select\.mode must be one of batch, exact, coverage, herding, cells, got 'fast'"),
        ("select:\n  mode: herdin\n", r"did you mean 'herding'"),
        ("similarity:\n  thresholds: [0.5, 1.5]\n", r"similarity\.thresholds must be in \[-1,1\)"),
        ("similarity:\n  max_memory: lots\n", r"similarity\.max_memory is not an amount of memory"),
        ("similarity:\n  edge_threshold: 0.95\n  duplicate_thresholds: [0.9]\n", r"lie below similarity\.edge_threshold"),
        ("evaluate:\n  test_fraction: 1.0\n", r"evaluate\.test_fraction must be in \(0,1\)"),
        ("embed:\n  batch_size: 0\n", r"embed\.batch_size must be >0, got 0"),
        ("manifest:\n  pseudonymise: 'no'\n", r"manifest\.pseudonymise must be true or false"),
        ("select:\n  seed_size: 1.5\n", r"select\.seed_size is not a size"),
        ("encoder:\n  epoch: 3\n", r"unknown key 'epoch'.*did you mean 'epochs'"),
        ("selct: {}\n", r"unknown config key 'selct' \(did you mean 'select'\?\)"),
    ],
)
def test_config_file_is_validated_whole(tmp_path, text, named):
    from enrich_dist.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_config(str(path))


def test_every_problem_is_listed_at_once():
    from enrich_dist.config import validate
    from enrich_dist.errors import ConfigError

    cfg = RunConfig()
    cfg.select.mode, cfg.encoder.epochs, cfg.report.images = "fast", -1, "all"
    with pytest.raises(ConfigError) as info:
        validate(cfg, {"select.mode": "--mode"})
    text = str(info.value)
    assert "select.mode (--mode) must be one of" in text and "encoder.epochs must be >0" in text
    assert "report.images must be one of thumbnails, none" in text
    validate(RunConfig())  # the defaults are valid
    optional = RunConfig()
    optional.similarity.edge_threshold, optional.similarity.max_memory = None, 1 << 30
    validate(optional)  # None where allowed, and memory in bytes


def test_bad_settings_exit_2_before_ray(tmp_path, caplog, monkeypatch):
    """A wrong flag value or config file exits 2 naming the key and flag; nothing is read, Ray never starts."""
    from enrich_dist import pipeline
    from enrich_dist.cli import main

    monkeypatch.setattr(pipeline, "ray_session", lambda *a, **k: pytest.fail("Ray must not start"))
    out = str(tmp_path / "run")
    assert main(["select", "--output", out, "--replicates", "0"]) == 2
    assert "select.replicates (--replicates) must be >0, got 0" in caplog.text
    assert main(["select", "--output", out, "--budgets", "0.1,abc"]) == 2
    assert "--budgets '0.1,abc'" in caplog.text
    bad = tmp_path / "c.yaml"
    bad.write_text("select:\n  mode: fast\n")
    assert main(["select", "--output", out, "--config", str(bad)]) == 2
    assert "select.mode must be one of" in caplog.text and "exit 2: configuration" in caplog.text
    assert not (tmp_path / "run").exists()


def test_exit_codes_by_kind(tmp_path):
    import errno

    from enrich_dist.errors import ConfigError, InfrastructureError, exit_code
    from enrich_dist.invariants import InvariantError
    from enrich_dist.storage import RunDir

    assert exit_code(ConfigError("x")) == 2
    assert exit_code(FileNotFoundError("x")) == 3 and exit_code(PermissionError("x")) == 3
    assert exit_code(InvariantError(RunDir(str(tmp_path)), "select", ["x"], {})) == 3 and exit_code(ValueError("bad image")) == 3
    assert exit_code(OSError(errno.ENOSPC, "disk full")) == 4 and exit_code(ConnectionError("x")) == 4
    assert exit_code(InfrastructureError("x")) == 4 and exit_code(TimeoutError()) == 4
    assert exit_code(KeyError("bug")) == 1


def test_ray_that_cannot_start_exits_4(tmp_path, caplog, monkeypatch):
    """Ray failing to start (or to attach) is infrastructure: exit 4, with the address and the fix."""
    import ray

    from enrich_dist.cli import main

    def refuse(*args, **kwargs):
        raise ConnectionError("could not reach the GCS")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["run", "--input", str(tmp_path), "--output", str(tmp_path / "run"), "--ray-address", "10.0.0.1:6379"]
    assert main(args) == 4
    assert "could not attach to the Ray cluster at 10.0.0.1:6379" in caplog.text and "exit 4" in caplog.text


def test_a_defect_keeps_its_traceback(tmp_path, monkeypatch):
    """An unexpected exception is not dressed up as a user error: it propagates (exit 1 with a traceback)."""
    from enrich_dist import cli

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "run_stages", broken)
    with pytest.raises(KeyError):
        cli.main(["report", "--output", str(tmp_path)])


def test_one_option_name_per_setting_and_old_spellings_warn(caplog):
    """--embed-device and --eval-* name their settings in every command; the old spellings still work, with a
    warning; every stage option of `enrich run` means the same setting as in its own stage command."""
    from enrich_dist.cli import FLAGS, build_parser, config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args([*argv, "--output", "r"]))

    assert cfg("embed", "--embed-device", "cpu").embed.device == "cpu"
    assert cfg("run", "--input", "x", "--embed-device", "cpu", "--eval-epochs", "3").evaluate.epochs == 3
    new = cfg("evaluate", "--eval-replicates", "2", "--eval-budgets", "0.1,0.2", "--eval-epochs", "4").evaluate
    caplog.clear()
    old = cfg("evaluate", "--replicates", "2", "--budgets", "0.1,0.2", "--epochs", "4").evaluate
    assert old == new and "--epochs is deprecated" in caplog.text and "use --eval-epochs" in caplog.text
    caplog.clear()
    assert cfg("embed", "--device", "cuda").embed.device == "cuda" and "use --embed-device" in caplog.text
    # in `run`, --epochs/--replicates/--budgets stay the encoder's and the selection's settings
    run = cfg("run", "--input", "x", "--epochs", "7", "--replicates", "3", "--budgets", "0.5,1.0")
    assert (run.encoder.epochs, run.select.replicates, run.evaluate.epochs) == (7, 3, 5)
    # one option per setting and one setting per option, generated from the config's fields
    assert len(set(FLAGS.values())) == len(FLAGS)


def test_options_are_generated_from_the_settings():
    """Every setting declared with an option appears in its stage's command and in `run`, with the field's default
    in its help; a value given on the command line lands in that field with the field's type."""
    import argparse
    import dataclasses

    from enrich_dist.cli import COMMAND_SECTIONS, SECTIONS, build_parser, config_from_args
    from enrich_dist.config import SECTION_TYPES

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public API
    for section in SECTIONS:
        for f in dataclasses.fields(SECTION_TYPES[section]):
            flag = f.metadata.get("flag")
            if not flag:
                continue
            for command, sections in COMMAND_SECTIONS.items():
                if (command, flag) == ("train-encoder", "--embedder"):
                    continue  # the encoder to train: vae or contrastive only
                options = {o for a in commands[command]._actions if a.help != argparse.SUPPRESS  # noqa: SLF001
                           for o in a.option_strings}
                assert (flag in options) == (section in sections), (command, flag)
            helps = {a.help for a in commands["run"]._actions if flag in a.option_strings}  # noqa: SLF001
            if f.default is not None and "action" not in f.metadata and "default" not in f.metadata["help"]:
                shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
                assert any(f"(default {shown})" in h for h in helps), flag
    cfg = config_from_args(parser.parse_args(["run", "--input", "x", "--output", "r", "--top-k", "7", "--sample", "0.5",
                                              "--budgets", "0.1,20", "--no-pseudonymise", "--nifti-axis", "0"]))
    assert (cfg.similarity.top_k, cfg.encoder.sample, cfg.select.budgets) == (7, 0.5, (0.1, 20))
    assert cfg.manifest.pseudonymise is False and cfg.manifest.nifti_axis == 0
