"""Every bad-input case of the CLI: one-line error naming the file or folder, exit code 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_BACKBONE, fake_bundle, make_class_folder
from melanoma_detector.cli import main


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), "--backbone", TINY_BACKBONE, "--no-pretrained",
                 "--image-size", "32", "--epochs-frozen", "1", "--epochs-finetune", "0", "--batch-size", "8",
                 "--no-progress", *extra])


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return err


def test_missing_folder(tmp_path, capsys):
    assert _train(tmp_path / "nope", tmp_path / "out") == 2
    _one_line_error(capsys, "nope", "accepted")


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _train(tmp_path / "empty", tmp_path / "out") == 2
    _one_line_error(capsys, "empty", "accepted")


def test_single_class(tmp_path, capsys):
    root = tmp_path / "single"
    make_class_folder(root, 4, np.random.default_rng(0))
    for p in (root / "malignant").iterdir():
        p.unlink()
    (root / "malignant").rmdir()
    assert _train(root, tmp_path / "out") == 2
    _one_line_error(capsys, "only one class", "benign and malignant")


def test_unknown_class_folder(tmp_path, capsys):
    root = tmp_path / "odd"
    make_class_folder(root, 2, np.random.default_rng(0))
    (root / "nevus").mkdir()
    assert _train(root, tmp_path / "out") == 2
    _one_line_error(capsys, "nevus", "accepted class folders: benign, malignant")


def test_a_non_image_file_beside_the_images_is_left_out_with_a_warning(tmp_path, caplog):
    """A notes.txt in a class folder is no image (`data check` lists it as harmless); train used to refuse the whole
    data set for it as a "bad image". Now it is left out, said, and counted in data_summary.json."""
    root = tmp_path / "data"
    make_class_folder(root / "train", 6, np.random.default_rng(0))
    make_class_folder(root / "test", 2, np.random.default_rng(1))
    (root / "train" / "benign" / "notes.txt").write_bytes(b"hello")
    caplog.set_level("WARNING")
    assert _train(root, tmp_path / "out") == 0
    assert any("left out 1 non-image file(s)" in r.getMessage() and "notes.txt" in r.getMessage()
               for r in caplog.records)
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert summary["ignored_non_image_files"] == 1 and summary["skipped_bad_images"] == 0


@pytest.mark.parametrize("content,name", [(b"", "zero.jpg"), (b"GIF89a garbage", "bad.jpg")])
def test_bad_file_in_data_then_skip(tmp_path, capsys, content, name):
    root = tmp_path / "data"
    make_class_folder(root / "train", 6, np.random.default_rng(0))
    make_class_folder(root / "test", 2, np.random.default_rng(1))
    (root / "train" / "benign" / name).write_bytes(content)
    assert _train(root, tmp_path / "out") == 2
    _one_line_error(capsys, name, "--skip-bad-images")
    assert _train(root, tmp_path / "out2", "--skip-bad-images") == 0
    assert "skipped_bad_images\": 1" in (tmp_path / "out2" / "data_summary.json").read_text()
    # The run's split.csv leaves the skipped file out; reusing it (as --resume does) skips it again.
    assert _train(root, tmp_path / "out3", "--skip-bad-images", "--split-file", str(tmp_path / "out2" / "split.csv")) == 0


def test_unknown_backbone(seed_layout, tmp_path, capsys):
    rc = main(["train", "--data", str(seed_layout), "--out", str(tmp_path / "o"), "--backbone", "no_such_net",
               "--no-pretrained", "--no-progress"])
    assert rc == 2
    _one_line_error(capsys, "no_such_net", "timm")


def test_bad_config_file(seed_layout, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochz: 3\n")
    assert _train(seed_layout, tmp_path / "o", "--config", str(cfg)) == 2
    _one_line_error(capsys, "epochz", "accepted")


def test_missing_model_and_paths(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "none.pt"), str(tmp_path)]) == 2
    _one_line_error(capsys)
    (tmp_path / "fake.pt").write_bytes(b"not a checkpoint")
    img_dir = tmp_path / "imgs"
    make_class_folder(img_dir, 1, np.random.default_rng(0))
    assert main(["predict", "--model", str(tmp_path / "fake.pt"), str(img_dir)]) == 2
    _one_line_error(capsys, "fake.pt", "not a checkpoint", "accepted")
    assert main(["predict", "--model", str(tmp_path / "fake.pt"), str(tmp_path / "missing.jpg")]) == 2
    _one_line_error(capsys, "missing.jpg")
    assert main(["evaluate", "--model", str(tmp_path / "fake.pt"), "--data", str(tmp_path / "nodata")]) == 2
    _one_line_error(capsys)


@pytest.mark.parametrize("content,fragment", [
    (b"# notes\nnot a split\n", "columns # notes; accepted: a split CSV with columns key and split"),
    (b"key,label\nkaggle/train/benign/a.jpg,0\n", "columns key, label; accepted"),
    (b"\xff\xfe\x00garbage", "not a readable CSV"),
])
def test_a_split_file_that_is_not_a_split_is_refused(seed_layout, tmp_path, capsys, content, fragment):
    (tmp_path / "split.csv").write_bytes(content)
    assert main(["evaluate", "--data", str(seed_layout), "--split-file", str(tmp_path / "split.csv"),
                 "--out", str(tmp_path / "report")]) == 2
    _one_line_error(capsys, "split.csv", fragment)
    assert _train(seed_layout, tmp_path / "out", "--split-file", str(tmp_path / "split.csv")) == 2
    _one_line_error(capsys, "split.csv", fragment)


def test_bad_flag_exit_code_two_without_traceback(tmp_path):
    for args in (["train", "--data", "x", "--out", "y", "--epochs-frozen", "-3"],
                 ["train", "--data", "x", "--out", "y", "--device", "tpu"],
                 ["frobnicate"]):
        r = subprocess.run([sys.executable, "-m", "melanoma_detector", *args], capture_output=True, text=True)
        assert r.returncode == 2, args
        assert "Traceback" not in r.stderr
        assert "accepted" in r.stderr or "invalid" in r.stderr or "expected" in r.stderr


def test_version_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "melanoma_detector", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "melanoma-detector" in r.stdout


def test_a_results_file_that_cannot_be_written_is_refused_before_any_image_is_scored(tmp_path, capsys, monkeypatch):
    import melanoma_detector.cli as cli

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(cli, "_make_predictor", never)
    img_dir = tmp_path / "imgs"
    make_class_folder(img_dir, 1, np.random.default_rng(0))
    assert main(["predict", str(img_dir), "--json", str(tmp_path)]) == 2
    _one_line_error(capsys, "--json", "is a folder; accepted: a file name")
    (tmp_path / "file").write_text("")
    assert main(["predict", str(img_dir), "--csv", str(tmp_path / "file" / "p.csv")]) == 2
    _one_line_error(capsys, "--csv", "cannot make its folder")


def test_results_files_go_into_new_folders_as_out_does(tmp_path, capsys):
    import csv
    import json
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    image = min(examples.glob("*.jpg"))
    assert main(["predict", str(image), "--csv", str(tmp_path / "a" / "p.csv"), "--json", str(tmp_path / "b" / "p.json"),
                 "--no-progress"]) == 0
    with (tmp_path / "a" / "p.csv").open() as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == [str(image)]
    assert json.loads((tmp_path / "b" / "p.json").read_text())["results"][0]["status"] == "ok"


def test_evaluate_never_writes_its_report_into_a_run_or_a_bundle(seed_layout, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {}\n")
    (run / "metrics.json").write_text('{"best": 1}')
    assert main(["evaluate", "--data", str(seed_layout), "--out", str(run)]) == 2
    _one_line_error(capsys, "is a training run (it holds config.yaml)", "accepted: a new folder")
    assert (run / "metrics.json").read_text() == '{"best": 1}'
    bundle = fake_bundle(tmp_path / "bundle")
    assert main(["evaluate", "--data", str(seed_layout), "--out", str(bundle)]) == 2
    _one_line_error(capsys, "is a model bundle")
    assert sorted(p.name for p in bundle.iterdir()) == ["metadata.json", "model.onnx"]


def test_train_never_writes_a_run_into_a_bundle(seed_layout, tmp_path, capsys):
    bundle = fake_bundle(tmp_path / "bundle")
    assert _train(seed_layout, bundle) == 2
    _one_line_error(capsys, "holds a model bundle; accepted: a new folder")
    assert sorted(p.name for p in bundle.iterdir()) == ["metadata.json", "model.onnx"]


def test_a_command_whose_extra_is_not_installed_says_which_to_install(seed_layout, tmp_path):
    # As in a serving-only install (pip install '.[serve]'): torch cannot be imported.
    code = ("import sys; sys.modules['torch'] = None; from melanoma_detector.cli import main; "
            f"sys.exit(main(['train', '--data', {str(seed_layout)!r}, '--out', {str(tmp_path / 'run')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == ("error: `melanoma train` needs torch, which this installation lacks; accepted: pip "
                                "install 'melanoma-detector[train]' (from a clone: pip install -e '.[train]', or "
                                "make install)")


def test_a_file_system_refusal_anywhere_is_one_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    img_dir = tmp_path / "imgs"
    make_class_folder(img_dir, 1, np.random.default_rng(0))
    # --out through a file: the batch writer's mkdir raises FileExistsError deep inside
    assert main(["predict", str(img_dir), "--out", str(tmp_path / "afile" / "out.csv"), "--no-progress"]) == 2
    _one_line_error(capsys, "afile", "accepted")


def test_results_never_replace_an_image_and_a_probe_catches_what_permission_bits_miss(tmp_path, capsys, monkeypatch):
    import melanoma_detector.cli as cli

    monkeypatch.setattr(cli, "_make_predictor", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    img_dir = tmp_path / "imgs"
    make_class_folder(img_dir, 1, np.random.default_rng(0))
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"\xff\xd8 an image")
    assert main(["predict", str(img_dir), "--csv", str(victim)]) == 2
    _one_line_error(capsys, "--csv", "image file name")
    assert victim.read_bytes() == b"\xff\xd8 an image"
    # /proc takes no new files whatever os.access says for root
    assert main(["predict", str(img_dir), "--json", "/proc/melanoma-probe.json"]) == 2
    _one_line_error(capsys, "--json", "not writable")
    ok = tmp_path / "new.csv"
    assert cli._check_output_file("--csv", str(ok)) is None and not ok.exists()  # the probe leaves nothing behind


def test_a_manifest_that_lists_nothing_or_is_an_image_is_refused_with_or_without_out(tmp_path, capsys, monkeypatch):
    import melanoma_detector.cli as cli

    monkeypatch.setattr(cli, "_make_predictor", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    empty = tmp_path / "empty.csv"
    empty.write_text("path\n")
    for extra in ([], ["--out", str(tmp_path / "o.csv")]):
        assert main(["predict", "--manifest", str(empty), *extra]) == 2
        _one_line_error(capsys, "lists no images")
    image = tmp_path / "real.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100))
    assert main(["predict", "--manifest", str(image)]) == 2
    _one_line_error(capsys, "binary file")


def test_control_characters_in_a_name_never_reach_the_terminal():
    from melanoma_detector.cli import _printable

    shown = _printable("a\x1b[31mRED\x1b[0m\n\t\x9b.jpg")
    assert shown == "a\\x1b[31mRED\\x1b[0m\\n\\t\\x9b.jpg" and shown.isprintable()


def test_serve_refuses_a_busy_port_and_an_unknown_host_in_one_line(capsys, monkeypatch):
    import socket

    monkeypatch.delenv("MELANOMA_AUTH", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
        _one_line_error(capsys, f"--port {port}", "cannot listen", "accepted")
    assert main(["serve", "--host", "no-such-host.invalid"]) == 2
    _one_line_error(capsys, "no-such-host.invalid", "cannot resolve")


def test_every_command_help_carries_the_disclaimer():
    from melanoma_detector import DISCLAIMER
    from melanoma_detector.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())
        assert " ".join(DISCLAIMER.split()) in text, name


def test_a_bundle_where_a_checkpoint_is_expected_is_named_and_unbundle_checks_its_data(tmp_path, capsys):
    bundle = fake_bundle(tmp_path / "bundle")
    (bundle / "model.onnx").write_bytes(b"")
    assert main(["export", "--model", str(bundle), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "a model bundle, not a checkpoint", "melanoma unbundle")
    assert main(["unbundle", "--out", str(tmp_path / "members"), "--data", str(tmp_path / "nope")]) == 2
    _one_line_error(capsys, "--data", "nope", "not found")


def test_the_output_probe_never_touches_a_pipe_or_a_dangling_link(tmp_path):
    import os
    import threading

    from melanoma_detector.cli import _check_output_file

    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    _check_output_file("--json", str(fifo))  # an append-open probe would hand the reader its EOF here
    with open(fifo, "w") as fh:
        fh.write("results")
    reader.join(10)
    assert got == ["results"]
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "target.json")
    _check_output_file("--json", str(link))
    assert link.is_symlink() and not (tmp_path / "target.json").exists()


def test_a_reader_that_stops_early_is_not_an_error():
    # a command whose reader went away (`melanoma predict ... --json - | head`) ends quietly, not with
    # "error: Broken pipe; accepted: paths this user can read ..."
    script = ("import sys, melanoma_detector.cli as cli\n"
              "def gone(args):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
              "cli.cmd_predict = gone\n"
              "sys.exit(cli.main(['predict', 'x.jpg']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_an_unknown_flag_is_named_with_its_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict", "x.jpg", "--bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("melanoma predict: error: unrecognized arguments: --bogus") and "melanoma predict --help" in err
    with pytest.raises(SystemExit):
        main(["data", "check", "somewhere", "--bogus"])
    assert capsys.readouterr().err.startswith("melanoma data check: error: unrecognized arguments: --bogus")


def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, capsys):
    for args in (["predict", ""], ["predict", str(tmp_path), "--out", ""], ["predict", str(tmp_path), "--csv", ""],
                 ["predict", "--manifest", ""]):
        assert main(args) == 2, args
        _one_line_error(capsys, "is empty", "accepted")


def test_a_folder_given_as_manifest_is_named_as_one(tmp_path, capsys):
    assert main(["predict", "--manifest", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a folder", "goes as an argument")


def test_a_test_image_that_is_a_copy_of_a_training_image_is_warned_about(tmp_path, caplog):
    """`data check` found it (LEAKAGE), while train and evaluate said nothing."""
    import shutil

    root = tmp_path / "data"
    make_class_folder(root / "train", 6, np.random.default_rng(0))
    make_class_folder(root / "test", 2, np.random.default_rng(1))
    src = sorted((root / "train" / "benign").iterdir())[0]
    shutil.copy(src, root / "test" / "benign" / "copy.jpg")
    caplog.set_level("WARNING")
    assert _train(root, tmp_path / "out") == 0
    assert any("byte-identical copies of training images" in r.getMessage() and "copy.jpg" in r.getMessage()
               for r in caplog.records)
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert summary["val_test_copies_of_train"] == 1 and summary["copies"][0][0].endswith("copy.jpg")
