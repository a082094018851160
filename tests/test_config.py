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
    ("train.batch_size", 1, "an integer >= 2"), ("train.epochs_finetune", -1, "a number >= 0"),
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


@pytest.mark.parametrize("yaml_text,key,shown,accepted", [
    ("model: {pretrained: [false]}", "model.pretrained", "[False]", "true or false"),
    ("model: {pretrained: 2}", "model.pretrained", "2", "true or false"),
    ("model: {pretrained: maybe}", "model.pretrained", "'maybe'", "true or false"),
    ("model: {hidden: [a, b]}", "model.hidden", "['a', 'b']", "a list of 2 integers, e.g. [512, 256]"),
    ("model: {hidden: [512]}", "model.hidden", "[512]", "a list of 2 integers, e.g. [512, 256]"),
    ("model: {dropout: [0.1, 0.2, 0.3]}", "model.dropout", "[0.1, 0.2, 0.3]", "a list of 2 finite numbers"),
    ("model: {backbone: [tf_efficientnet_lite0]}", "model.backbone", "['tf_efficientnet_lite0']", "a string"),
    ("model: {backbone: null}", "model.backbone", "null", "a string"),
    ("model: {image_size: big}", "model.image_size", "'big'", "an integer, or null"),
    ("data: {paths: [[a]]}", "data.paths", "[['a']]", "a list of strings"),
    ("train: {batch_size: 1e3x}", "train.batch_size", "'1e3x'", "an integer"),
    ("train: {batch_size: 32.5}", "train.batch_size", "32.5", "an integer"),
    ("train: {batch_size: true}", "train.batch_size", "True", "an integer"),
    ("train: {seed: 99999999999999999999}", "train.seed", "99999999999999999999", "an integer in [0, 2**63)"),
    ("train: {seed: -1}", "train.seed", "-1", "an integer in [0, 2**63)"),
    ("train: {lr_frozen: .inf}", "train.lr_frozen", "inf", "a finite number"),
    ("train: {min_lr: .nan}", "train.min_lr", "nan", "a finite number"),
    ("train: {distill_temperature: 1e999}", "train.distill_temperature", "inf", "a finite number"),
    ("train: {amp: off}", "train.amp", "False", "a string (YAML reads unquoted"),
])
def test_config_file_values_of_the_wrong_type_are_one_line_errors(tmp_path, yaml_text, key, shown, accepted):
    # Not a traceback later on, nor a silent misreading ([false] used to become pretrained: true).
    (tmp_path / "c.yaml").write_text(yaml_text + "\n")
    with pytest.raises(UserError) as info:
        load_config(tmp_path / "c.yaml")
    assert str(info.value).startswith(f"config {key}: {shown}; accepted: {accepted}"), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["train.lr_frozen", "train.lr_finetune", "train.l2", "train.min_lr",
                                 "train.distill_temperature", "train.mix_alpha", "train.distill_weight",
                                 "train.ema_decay", "train.layer_decay", "data.val_fraction"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_config_refuses_non_finite_numbers(key, value):
    # --lr-frozen inf used to pass and fail mid-run with "scores contain NaN or infinite values".
    with pytest.raises(UserError, match=rf"config {re.escape(key)}: .*accepted: a finite number"):
        load_config(None, {key: value})


def test_config_reads_the_spellings_yaml_and_the_cli_give():
    # PyYAML reads 1e3 and 1e-4 (no dot) as strings; booleans as the words the module has always taken.
    cfg = load_config(None, {"train.batch_size": "1e3", "train.lr_frozen": "1e-4", "train.epochs_frozen": 3.0,
                             "model.pretrained": "no", "train.compile": True, "model.hidden": "64,32",
                             "train.seed": 2**63 - 1, "data.paths": ["a", "b"]})
    assert (cfg.train.batch_size, cfg.train.lr_frozen, cfg.train.epochs_frozen) == (1000, 1e-4, 3)
    assert cfg.model.pretrained is False and cfg.train.compile is True and cfg.model.hidden == (64, 32)
    assert cfg.train.seed == 2**63 - 1 and cfg.data.paths == ("a", "b")
    # 0/1 as YAML writes them unquoted, as the older loader took them
    cfg = load_config(None, {"model.pretrained": 1, "train.compile": 0, "train.cache_dihedral": 1.0})
    assert cfg.model.pretrained is True and cfg.train.compile is False and cfg.train.cache_dihedral is True


def test_every_shipped_config_and_a_saved_one_load(tmp_path):
    from melanoma_detector.config import Config, save_config

    for path in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"):
        load_config(path)
    save_config(Config(), tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == Config()
