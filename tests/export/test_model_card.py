"""MODEL_CARD.md states only what the bundle's metadata says: its initialisation, data, split, licence and gate
(the shipped card's wording, byte for byte, is checked in test_external.py)."""

import copy
import json
from pathlib import Path

from melanoma_detector.export.bundle import _data_credits
from melanoma_detector.export.model_card import write_model_card

REPO = Path(__file__).resolve().parents[2]
SHIPPED = json.loads((REPO / "models" / "default" / "metadata.json").read_text())


def _single(paths, *, pretrained=True, **model):
    """The shipped metadata as a single model trained on `paths` (what export writes for such a run)."""
    meta = copy.deepcopy(SHIPPED)
    meta.pop("external_validation", None)
    meta["training"].pop("members")
    meta["backbone"] = "tf_efficientnet_lite0"
    cfg = meta["training"]["config"]
    cfg["data"]["paths"] = list(paths)
    cfg["model"].update(pretrained=pretrained, **model)
    meta["training"]["data"] = _data_credits(paths)
    if not any("ham10000" in p for p in paths):
        meta["licence"] = "see the training data's licence"
    return meta


def _card(tmp_path, meta):
    return write_model_card(tmp_path, meta).read_text()


def test_a_card_claims_no_pretraining_or_collection_its_metadata_does_not_hold(tmp_path):
    card = _card(tmp_path, _single(["/tmp/x/data"], pretrained=False))
    for claim in ("ImageNet", "HAM10000", "ISIC 2017", "200x150", "256x256", "non-commercial", "both data sets"):
        assert claim not in card, claim
    assert "(randomly initialised, no pretrained weights, timm)" in card
    assert "seeded; /tmp/x/data 70/15/15 train/val/test" in card
    assert "inherits the terms of the data it was trained on" in card and "skin types is not recorded" in card


def test_pretraining_as_configured(tmp_path):
    assert "(ImageNet-pretrained, timm)" in _card(tmp_path, _single(["/d/ham10000"]))
    card = _card(tmp_path, _single(["/d/ham10000"], allow_random_init=True))
    assert "(ImageNet-pretrained, timm)" not in card and "random initialisation allowed" in card
    assert "pretrained weights from `lite0.safetensors`" in _card(
        tmp_path, _single(["/d/ham10000"], pretrained=False, weights="/w/lite0.safetensors"))
    meta = copy.deepcopy(SHIPPED)
    meta["training"]["members"][1]["config"]["model"]["pretrained"] = False
    card = _card(tmp_path, meta)
    assert ("`tf_efficientnet_lite0`: ImageNet-pretrained, timm; `tf_efficientnet_lite2`: randomly initialised"
            in card)


def test_facts_of_a_collection_are_said_of_it_alone(tmp_path):
    card = _card(tmp_path, _single(["/d/ham10000"], hidden=[256, 128], dropout=[0.3, 0.2]))
    assert "seeded; HAM10000 70/15/15 train/val/test. **Model weights" in card and "ISIC 2017" not in card
    assert "inherits the non-commercial terms of HAM10000" in card
    assert "- HAM10000 was shrunk to 200x150 for this training run" in card
    assert "under-represented in HAM10000; performance" in card
    assert "+ a head\n  (GAP -> BatchNorm -> Dense 256 ReLU -> Dropout 0.3 -> Dense 128 ReLU -> Dropout 0.2 -> Dense 1)" in card
    card = _card(tmp_path, _single(["/d/isic2017", "/d/site"]))
    assert "ISIC 2017 train -> train, ISIC 2017 val -> val,\n/d/site 70/15/15 train/val/test" in card
    assert "HAM10000" not in card and "never seen full-resolution" not in card
    assert "- ISIC 2017 squashed to 256x256 for this training run (the other data's resolution is not recorded)" in card


def test_a_recalibrated_card_names_the_images_its_refitted_gate_compares_against(tmp_path):
    meta = _single(["/d/ham10000"])
    meta["input_gate"]["refitted"] = {"by": "melanoma recalibrate", "date": "2026-12-02", "data": ["/d/site"],
                                      "n_fit": 60}
    meta["recalibration"] = {
        "source_bundle": {"model_version": "0.1.0", "temperature": 1.2, "logit_bias": -1.0,
                          "thresholds": {"screening": 0.05, "high_specificity": 0.2}},
        "data": ["/d/site"], "n_fit": 60, "n_fit_malignant": 12, "n_holdout": 0, "gate": "refit",
        "source_gate_refused_fraction": 0.1, "holdout_refused_fraction": None}
    meta["metrics"] = {"n_resamples": 20}  # nothing held out: no figures
    card = _card(tmp_path, meta)
    assert "far from those of the recalibration images of /d/site (" in card
    assert "those of the validation images" not in card
    meta["recalibration"]["gate"] = "keep"
    del meta["input_gate"]["refitted"]
    assert "far from those of the validation images (" in _card(tmp_path, meta)


def test_a_users_collection_is_described_by_the_split_that_happened(tmp_path):
    """A Kaggle-style folder keeps its own test/ folder, so the configured 70/15/15 is not what happened, and with no
    lesion ids the split was by image: the card said "lesion-grouped" and "70/15/15" regardless."""
    meta = _single(["/tmp/x/kaggle"])
    meta["splits"] = {"file": "runs/r/split.csv", "val": 12, "test": 24}
    for part in ("val", "test"):
        meta["metrics"][part].update(n=meta["splits"][part], n_groups=meta["splits"][part])
    card = _card(tmp_path, meta)
    assert "Split: by image (the data names no lesion groups" in card and "lesion-grouped" not in card
    assert "its own train/val/test folders are kept); 12 validation and 24 test images" in card
    grouped = _single(["/tmp/x/kaggle"])
    assert "Split: lesion-grouped (no lesion on two sides)" in _card(tmp_path, grouped)  # n_groups < n
