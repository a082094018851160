import re
from pathlib import Path

import pytest

from melanoma_detector.config import load_config
from melanoma_detector.errors import UserError


@pytest.mark.parametrize("key,value,accepted", [
    ("train.amp", "fp8", "auto, bf16, fp16, off"), ("train.phase2_mode", "fast", "auto, plain, cached"),
    ("train.device", "tpu", "auto, cpu, cuda"), ("train.lr_schedule", "step", "plateau, cosine"),
    ("train.augmentation", "extreme", "standard, strong, acquisition")])
def test_config_rejects_unknown_choices_with_the_accepted_ones(key, value, accepted):
    with pytest.raises(UserError, match=f"is not one of {re.escape(accepted)}"):
        load_config(None, {key: value})


def test_gpu_config_loads_with_the_seed_epochs():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml")
    assert (cfg.train.epochs_frozen, cfg.train.epochs_finetune) == (25, 35)
    assert cfg.train.phase2_mode == "plain" and cfg.model.image_size == 260


@pytest.mark.parametrize("key,value,accepted", [
    ("model.image_size", -5, "an integer >= 16"), ("model.dropout", (0.45, 1.0), "in [0, 1)"),
    ("model.hidden", (512, 0), "an integer >= 1"), ("train.lr_finetune", -1e-4, "a positive number"),
    ("train.batch_size", 0, "an integer >= 1"), ("train.epochs_finetune", -1, "a number >= 0"),
    ("train.unfreeze_fraction", 1.5, "in [0, 1]"), ("train.reduce_lr_factor", 1.0, "in (0, 1)"),
    ("train.threads", 0, "an integer >= 1"), ("data.val_fraction", 1.0, "in [0, 1)"),
    ("data.num_workers", -1, "a number >= 0"),
])
def test_config_rejects_out_of_range_numbers_with_what_is_accepted(key, value, accepted):
    # YAML values never pass the CLI's argument checks; the config refuses them before a run starts.
    with pytest.raises(UserError, match=rf"config {key}: .*; accepted: {re.escape(accepted)}"):
        load_config(None, {key: value})


def test_config_rejects_fractions_that_leave_nothing_to_train_on():
    with pytest.raises(UserError, match="a sum below 1"):
        load_config(None, {"data.val_fraction": 0.5, "data.test_fraction": 0.5})
    assert load_config(None, {"data.val_fraction": 0.2, "train.threads": None}).data.val_fraction == 0.2


def test_config_file_whose_section_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("train: 3\n")
    with pytest.raises(UserError, match="'train' is not a section of options; accepted"):
        load_config(tmp_path / "c.yaml")
