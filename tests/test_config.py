from pathlib import Path

import pytest

from melanoma_detector.config import load_config
from melanoma_detector.errors import UserError


@pytest.mark.parametrize("key,value", [("train.amp", "fp8"), ("train.phase2_mode", "fast"), ("train.device", "tpu"),
                                       ("train.lr_schedule", "step"), ("train.augmentation", "extreme")])
def test_config_rejects_unknown_choices_with_the_accepted_ones(key, value):
    with pytest.raises(UserError, match="is not one of"):
        load_config(None, {key: value})


def test_gpu_config_loads_with_the_seed_epochs():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml")
    assert (cfg.train.epochs_frozen, cfg.train.epochs_finetune) == (25, 35)
    assert cfg.train.phase2_mode == "plain" and cfg.model.image_size == 260
