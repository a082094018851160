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


@pytest.mark.parametrize("where", ["root", "inside"])
def test_a_run_folder_inside_a_data_folder_is_refused_before_anything_is_written(seed_layout, capsys, where):
    """A run inside the data (say `--out DATA/test/benign`) left config.yaml among the images, and every later
    `train` on that data refused it as a bad image."""
    out = seed_layout if where == "root" else seed_layout / "test" / "benign" / "run"
    before = sorted(p.relative_to(seed_layout) for p in seed_layout.rglob("*"))
    assert main(["train", "--data", str(seed_layout), "--out", str(out), "--backbone", TINY_BACKBONE,
                 "--no-pretrained", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "inside the data folder" in err and "accepted: a run folder outside every --data folder" in err
    assert "\n" not in err
    assert sorted(p.relative_to(seed_layout) for p in seed_layout.rglob("*")) == before


def test_a_run_refused_for_its_data_leaves_no_config_behind(tmp_path, capsys):
    data = tmp_path / "one-class" / "benign"
    data.mkdir(parents=True)
    import numpy as np

    from conftest import lesion_image

    rng = np.random.default_rng(0)
    for i in range(6):
        lesion_image(rng, False).save(data / f"b{i}.jpg")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "one-class"), "--out", str(out), "--backbone", TINY_BACKBONE,
                 "--no-pretrained", "--no-progress"]) == 2
    assert "error: " in capsys.readouterr().err
    assert not out.exists()


def test_ctrl_c_says_how_to_continue(seed_layout, tmp_path, capsys, monkeypatch):
    import melanoma_detector.training.trainer as trainer

    def interrupted(config, out_dir, **kwargs):
        (out_dir / "config.yaml").parent.mkdir(parents=True)
        (out_dir / "config.yaml").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run_training", lambda config, out, **kw: interrupted(config, tmp_path / "run", **kw))
    assert main(["train", "--data", str(seed_layout), "--out", str(tmp_path / "run"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"continue it with: melanoma train --resume {tmp_path / 'run'}" in err and "interrupted" in err
