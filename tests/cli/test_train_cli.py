"""`melanoma train` flag handling: what --resume refuses, and repeating a run from its config.yaml."""

import pytest

from conftest import TINY_BACKBONE
from melanoma_detector.cli import main


@pytest.mark.parametrize("extra,flag", [
    (["--seed", "0"], "--seed"), (["--epochs-finetune", "0"], "--epochs-finetune"),
    (["--ema-decay", "0"], "--ema-decay"), (["--lr-frozen", "0"], "--lr-frozen"),
    (["--no-pretrained"], "--no-pretrained"), (["--cache-dihedral"], "--cache-dihedral"),
])
def test_resume_refuses_options_given_as_zero_or_as_flags(tmp_path, capsys, extra, flag):
    # 0 and 0.0 are given values: --resume used to take them as "not given" and silently ignore them.
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume continues a run with its saved config.yaml; drop ") and "\n" not in err
    assert f"drop {flag} " in err, err


def test_resume_accepts_runtime_options_and_no_progress(tmp_path, capsys):
    # Past the flag check: the missing run folder is the complaint, not the flags.
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress", "--threads", "1",
                 "--workers", "0", "--device", "cpu"]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--out", "OUT"], "train needs --data (or data.paths in the --config file)"),
    (["train", "--data", "DATA"], "train needs --out"),
])
def test_train_names_what_is_missing(tmp_path, capsys, argv, fragment):
    argv = [a.replace("OUT", str(tmp_path / "o")).replace("DATA", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and "\n" not in err, err


def test_seed_and_lr_out_of_range_are_one_line_errors(tmp_path, capsys):
    for extra, fragment in ((["--seed", "99999999999999999999"], "config train.seed: 99999999999999999999; accepted"),
                            (["--lr-frozen", "inf"], "config train.lr_frozen: inf; accepted: a finite number")):
        assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fragment in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_run_repeats_from_its_config_yaml_alone(seed_layout, tmp_path, monkeypatch):
    # config.py promises that a run can be repeated from its config.yaml alone: the file holds data.paths.
    monkeypatch.chdir(tmp_path)
    first, again = tmp_path / "run1", tmp_path / "run2"
    assert main(["train", "--data", str(seed_layout), "--out", str(first), "--backbone", TINY_BACKBONE,
                 "--no-pretrained", "--image-size", "32", "--epochs-frozen", "1", "--epochs-finetune", "0",
                 "--batch-size", "8", "--threads", "1", "--seed", "5", "--no-progress"]) == 0
    assert main(["train", "--config", str(first / "config.yaml"), "--out", str(again), "--no-progress"]) == 0
    assert (again / "split.csv").read_text() == (first / "split.csv").read_text()
    assert (again / "config.yaml").read_text() == (first / "config.yaml").read_text()
