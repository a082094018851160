"""`melanoma unbundle`: the torch models recovered from a bundle's graph compute what the exported
checkpoints computed, export again to the same served model, and a bundle whose metadata does not
describe its graph is refused instead of yielding wrong weights."""

import csv
import json

import numpy as np
import pytest
import torch

from melanoma_detector.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import train_tiny_bundle

    return train_tiny_bundle(tmp_path_factory, n_train=12, n_test=6, epochs_frozen=1, epochs_finetune=1, resamples=20)


def _perturbed(run, path):
    """Another member: the run's checkpoint with every weight and BatchNorm statistic moved, so that
    folding a BatchNorm into its convolution is not close to the identity."""
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(1)
    state = {}
    for k, v in ckpt["model_state"].items():
        if k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) * 1.5 + 0.5
        elif v.is_floating_point():
            v = v + 0.1 * torch.randn(v.shape, generator=g)
        state[k] = v
    torch.save({**ckpt, "model_state": state}, path)
    return path


def _logits(ckpt_path, x):
    from melanoma_detector.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt_path)
    with torch.no_grad():
        return model(x).numpy()


def test_recovered_members_compute_the_exported_models(tiny_run, tmp_path):
    from melanoma_detector.export.bundle import export_bundle
    from melanoma_detector.export.unbundle import members_from_bundle

    _, run, _ = tiny_run
    other = _perturbed(run, tmp_path / "other.pt")
    export_bundle([run, other], tmp_path / "pair", use_data=False, uncalibrated=True)
    members = members_from_bundle(tmp_path / "pair")
    assert [c["source_bundle"]["member"] for _, c in members] == [0, 1]
    x = torch.randn(3, 3, 64, 64)
    for (model, ckpt), original in zip(members, [run / "checkpoint.pt", other]):
        with torch.no_grad():
            got = model(x).numpy()
        np.testing.assert_allclose(got, _logits(original, x), atol=1e-4)
        assert "temperature" not in ckpt  # a member's own calibration is not in an ensemble's bundle
    # The folded weights differ from the checkpoint's; the function does not.
    assert not torch.equal(members[1][0].head.norm.weight, torch.load(other, weights_only=True)["model_state"]["head.norm.weight"])


def test_unbundle_cli_round_trip_serves_the_same_model(tiny_run, tmp_path):
    from conftest import assert_serves_alike

    root, run, single = tiny_run
    out = tmp_path / "members"
    assert main(["unbundle", "--model", str(single), "--out", str(out)]) == 0
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    meta = json.loads((single / "metadata.json").read_text())
    assert ckpt["temperature"] == pytest.approx(meta["temperature"])  # one model: the bundle's calibration is its own
    assert (out / "split.csv").is_file()  # the bundle's recorded split, copied as in a run folder
    # A folder that holds a checkpoint (a trained run, say) is never overwritten.
    before = (run / "checkpoint.pt").read_bytes()
    assert main(["unbundle", "--model", str(single), "--out", str(run)]) != 0
    assert (run / "checkpoint.pt").read_bytes() == before
    again = tmp_path / "again"
    assert main(["export", "--model", str(out), "--out", str(again), "--resamples", "20"]) == 0
    assert_serves_alike(single, again, min((root / "test" / "malignant").iterdir()))


def test_a_keys_only_split_file_serves_as_the_runs_own_split(tiny_run, tmp_path, capsys):
    """The committed split (configs/splits/default.csv) lists keys, not this machine's paths: unbundle and
    export find its images in the data folders the model trained on, as the run's own split.csv names them."""
    root, run, single = tiny_run
    with (run / "split.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    keys = tmp_path / "keys.csv"
    with keys.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["key", "group", "label", "split"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "members"
    assert main(["unbundle", "--model", str(single), "--out", str(out), "--split", str(keys)]) == 0
    assert (out / "split.csv").read_text() == (run / "split.csv").read_text()
    bundle = tmp_path / "b"
    assert main(["export", "--model", str(out), "--split", str(keys), "--out", str(bundle), "--resamples", "20"]) == 0
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["metrics"]["val"]["n"] == sum(r["split"] == "val" for r in rows) > 0
    assert meta["metrics"]["val"] == json.loads((single / "metadata.json").read_text())["metrics"]["val"]
    # Data folders that do not hold the split's images: refused in one line, before anything is written.
    capsys.readouterr()
    assert main(["unbundle", "--model", str(single), "--out", str(tmp_path / "m2"), "--split", str(keys),
                 "--data", str(root / "test")]) != 0
    assert "not found under" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()
    # The split a bundle records is only a default: when its images are not found, the checkpoints come
    # without a split.csv (as on a machine without the data) instead of being refused.
    assert meta["splits"]["file"] == str(keys)
    assert main(["unbundle", "--model", str(bundle), "--out", str(tmp_path / "m3"), "--data", str(root / "test")]) == 0
    assert (tmp_path / "m3" / "checkpoint.pt").is_file() and not (tmp_path / "m3" / "split.csv").exists()


def test_metadata_that_does_not_describe_the_graph_is_refused(tiny_run, tmp_path, capsys):
    from melanoma_detector.errors import UserError
    from melanoma_detector.export.unbundle import members_from_bundle

    _, _, single = tiny_run
    bundle = tmp_path / "b"
    bundle.mkdir()
    for f in single.iterdir():
        (bundle / f.name).write_bytes(f.read_bytes())
    meta = json.loads((single / "metadata.json").read_text())
    # A gate cut at another depth: the weights load, but the graph's gate features are not reproduced.
    single_fraction = meta["training"]["config"]["train"]["unfreeze_fraction"]
    meta["training"]["config"]["train"]["unfreeze_fraction"] = 0.9
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="differ from the graph .* in gate_features"):
        members_from_bundle(bundle)
    # Another head width: refused by name and shape, not with a traceback.
    meta["training"]["config"]["train"]["unfreeze_fraction"] = single_fraction
    meta["training"]["config"]["model"]["hidden"] = [32, 8]
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="for head.fc1.weight"):
        members_from_bundle(bundle)
    # Another backbone: its layers do not match the graph's.
    meta["training"]["config"]["model"]["backbone"] = "tf_efficientnet_lite0"
    (bundle / "metadata.json").write_text(json.dumps(meta))
    assert main(["unbundle", "--model", str(bundle), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the graph" in err[0]
    assert not (tmp_path / "o").exists()  # nothing written from a refused bundle
    assert main(["unbundle", "--model", str(single), "--out", str(tmp_path / "p"), "--split", "nope.csv"]) != 0
    assert "split file not found: nope.csv" in capsys.readouterr().err


def test_the_shipped_bundle_is_recoverable_and_its_members_score_the_examples_alike():
    """The shipped pair, recovered, gives the example images the graph's own logit: the bundle in git
    stays a source of checkpoints for the next run to pair with."""
    from pathlib import Path

    from melanoma_detector.data.io import load_image
    from melanoma_detector.export.unbundle import members_from_bundle
    from melanoma_detector.inference import Predictor
    from melanoma_detector.inference.predictor import run_graph
    from melanoma_detector.preprocess import preprocess_image

    examples = sorted(p for p in (Path(__file__).parents[2] / "examples").iterdir() if p.suffix == ".jpg")
    predictor = Predictor()
    members = members_from_bundle(predictor.bundle)
    assert [c["backbone"] for _, c in members] == ["tf_efficientnet_lite0", "tf_efficientnet_lite2"]
    x = torch.from_numpy(np.stack([preprocess_image(load_image(p), predictor.pp) for p in examples]))
    with torch.no_grad():
        mean_logit = torch.stack([m(x) for m, _ in members]).mean(dim=0).numpy()
    graph = run_graph(predictor, [str(p) for p in examples], progress=False)["logit"]
    np.testing.assert_allclose(mean_logit, graph, atol=1e-4)


def test_a_split_goes_beside_the_members_only_when_they_all_trained_on_it(tiny_run, tmp_path, capsys, caplog):
    """A split.csv beside a checkpoint says which images it trained on (export then records train_keys_sha256
    from it, which --distill-from trusts), so unbundle writes one only when the bundle records that every
    member trained on that split's train images."""
    import shutil

    from melanoma_detector.data.splits import split_csv_fingerprint
    from melanoma_detector.export.bundle import export_bundle

    _, run, _ = tiny_run
    # Members from runs whose splits are not known to agree: the bundle records no training split.
    other = _perturbed(run, tmp_path / "other.pt")
    export_bundle([run, other], tmp_path / "mixed", use_data=False, uncalibrated=True)
    caplog.clear()
    assert main(["unbundle", "--model", str(tmp_path / "mixed"), "--out", str(tmp_path / "m"),
                 "--split", str(run / "split.csv")]) == 0
    assert [p.name for p in sorted((tmp_path / "m").rglob("*")) if p.is_file()] == ["checkpoint.pt"] * 2
    assert any("no split.csv written" in m and "every member" in m for m in caplog.messages)
    assert "no split.csv" in capsys.readouterr().out
    # Members that trained on one split: it goes beside each.
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(other, same / "checkpoint.pt")
    shutil.copy(run / "split.csv", same / "split.csv")
    meta = export_bundle([run, same], tmp_path / "pair", use_data=False, uncalibrated=True)
    assert meta["training"]["train_keys_sha256"] == split_csv_fingerprint(run / "split.csv")
    assert main(["unbundle", "--model", str(tmp_path / "pair"), "--out", str(tmp_path / "n"),
                 "--split", str(run / "split.csv")]) == 0
    for i in (0, 1):
        assert (tmp_path / "n" / f"member-{i}" / "split.csv").read_text() == (run / "split.csv").read_text()


def test_the_documented_rebuild_of_the_shipped_bundle_gets_the_committed_split():
    """`melanoma unbundle --split configs/splits/default.csv` writes it beside both shipped members because the
    bundle records that they trained on exactly its train images."""
    from pathlib import Path

    from melanoma_detector.data.splits import split_csv_fingerprint

    repo = Path(__file__).resolve().parents[2]
    meta = json.loads((repo / "models" / "default" / "metadata.json").read_text())
    assert meta["training"]["train_keys_sha256"] == split_csv_fingerprint(repo / "configs" / "splits" / "default.csv")
