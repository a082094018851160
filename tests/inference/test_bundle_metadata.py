"""load_bundle refuses a metadata.json that lacks a value the predictor needs, or holds one of an unusable
type, with one line naming the key and what it accepts: never a silent default (risk tiers, calibration)
or a KeyError later."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import fake_bundle
from melanoma_detector.cli import main
from melanoma_detector.inference.bundle import BundleError, _lookup, load_bundle

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "default"
EXAMPLE = min((SHIPPED.parents[1] / "examples").glob("*.jpg"), default=None)

# key deleted -> the key the error names
DELETED = {
    "graph": "graph.file",
    "class_names": "class_names",
    "preprocessing": "preprocessing.input_size",
    "preprocessing.input_size": "preprocessing.input_size",
    "preprocessing.mean": "preprocessing.mean",
    "preprocessing.std": "preprocessing.std",
    "temperature": "temperature",
    "logit_bias": "logit_bias",
    "thresholds": "thresholds.screening",
    "thresholds.screening": "thresholds.screening",
    "thresholds.high_specificity": "thresholds.high_specificity",
    "risk_tiers": "risk_tiers",
}


def _edited(tmp_path: Path, edit) -> Path:
    bundle = fake_bundle(tmp_path / "bundle")
    meta = json.loads((bundle / "metadata.json").read_text())
    edit(meta)
    (bundle / "metadata.json").write_text(json.dumps(meta))
    return bundle


def _delete(key: str):
    def edit(meta):
        *parents, last = key.split(".")
        node = meta
        for p in parents:
            node = node[p]
        del node[last]
    return edit


def _set(key: str, value):
    def edit(meta):
        *parents, last = key.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def _refused(bundle: Path, *fragments: str) -> str:
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle, verify=False)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(str(bundle / "metadata.json")), message
    for f in fragments:
        assert f in message, (f, message)
    return message


def test_shipped_bundle_loads():
    bundle = load_bundle(SHIPPED)
    assert bundle.logit_bias == json.loads((SHIPPED / "metadata.json").read_text())["logit_bias"]


@pytest.mark.parametrize("deleted", sorted(DELETED))
def test_missing_key_is_refused_naming_it(tmp_path, deleted):
    bundle = _edited(tmp_path, _delete(deleted))
    _refused(bundle, f"missing '{DELETED[deleted]}'", "accepted", "melanoma export")


@pytest.mark.parametrize("key,value,words", [
    ("temperature", "1.2", "a positive number"),
    ("temperature", 0, "a positive number"),
    ("logit_bias", None, "a number"),
    ("thresholds.screening", 1.5, "between 0 and 1"),
    ("thresholds.high_specificity", "0.2", "between 0 and 1"),
    ("risk_tiers", [], "non-empty list"),
    ("risk_tiers", [{"level": "High", "recommendation": "see a doctor"}], "risk_tiers[0]"),
    ("class_names", ["benign"], "2 class names"),
    ("preprocessing.input_size", "192", "positive whole number"),
    ("preprocessing.std", [0.5, 0.5], "3 positive numbers"),
    ("preprocessing.interpolation", "sharpest", "interpolation 'sharpest'; accepted"),
    ("format_version", "1", "whole number"),
    ("input_gate.ood.threshold", None, "input_gate.ood"),
])
def test_unusable_value_is_refused(tmp_path, key, value, words):
    bundle = _edited(tmp_path, _set(key, value))
    _refused(bundle, key.split(".")[0], words)


def test_bundle_from_before_the_logit_bias_loads_with_bias_zero(tmp_path):
    """Format-1 bundles exported before calibration had a bias recorded temperature scaling only."""
    def pre_bias(meta):
        del meta["logit_bias"]
        meta["calibration"]["method"] = "temperature scaling on the validation split"
    assert load_bundle(_edited(tmp_path, pre_bias), verify=False).logit_bias == 0.0

    def uncalibrated(meta):  # exported without validation data: T = 1, nothing fitted
        del meta["logit_bias"], meta["calibration"]
        meta["temperature"] = 1.0
    assert load_bundle(_edited(tmp_path / "u", uncalibrated), verify=False).logit_bias == 0.0


def test_lookup_of_nested_keys():
    meta = {"a": {"b": 1}, "c": [1]}
    assert _lookup(meta, "a.b") == 1
    assert _lookup(meta, "a.x") is _lookup(meta, "c.b") is _lookup(meta, "z")


def _shipped_copy(tmp_path: Path, edit) -> Path:
    """models/default with an edited metadata.json (graph and gate statistics linked, not copied)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in SHIPPED.iterdir():
        if f.is_file() and f.name != "metadata.json":
            (bundle / f.name).symlink_to(f.resolve())
    meta = json.loads((SHIPPED / "metadata.json").read_text())
    edit(meta)
    (bundle / "metadata.json").write_text(json.dumps(meta))
    return bundle


@pytest.mark.skipif(EXAMPLE is None or not (SHIPPED / "model.onnx").is_file(), reason="no shipped bundle")
@pytest.mark.parametrize("deleted", ["risk_tiers", "temperature", "thresholds.screening", "preprocessing.input_size"])
def test_cli_predict_with_incomplete_bundle_is_one_line_error(tmp_path, capsys, deleted):
    """Without risk tiers a p = 0.8 image printed "Low"; without the others, a KeyError traceback or
    uncalibrated probabilities."""
    bundle = _shipped_copy(tmp_path, _delete(deleted))
    assert main(["predict", "--model", str(bundle), str(EXAMPLE), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert f"missing '{DELETED[deleted]}'" in err and str(bundle) in err, err
    assert "Low" not in captured.out


def test_predictor_without_risk_tiers_refuses_to_load(tmp_path):
    from melanoma_detector.inference import Predictor

    with pytest.raises(BundleError, match="missing 'risk_tiers'"):
        Predictor(_shipped_copy(tmp_path, _delete("risk_tiers")))
