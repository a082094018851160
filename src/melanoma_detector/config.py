"""Run configuration: frozen dataclasses, loaded from YAML, overridden from the CLI.

Every run writes its resolved configuration (`config.yaml`) into its run folder, so a run can
be repeated from that file alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from melanoma_detector.errors import UserError
from melanoma_detector.preprocess import COLOR_CONSTANCY, RESIZE_MODES

LR_SCHEDULES = ("plateau", "cosine")
AUGMENTATIONS = ("standard", "strong", "acquisition")
MIX_KINDS = ("none", "mixup", "cutmix")
# The splits `melanoma evaluate --split` scores (here so the CLI can list them without imports).
EVAL_SPLITS = ("test", "val", "all")  # "all": every image, whatever split it is on
RECALIBRATION_GATES = ("refit", "keep")  # `melanoma recalibrate --gate`: re-fit the input gate, or keep it

# The seed notebook's recipe, kept as the defaults.
SEED_BACKBONE = "efficientnet_b3"

# What a numeric option accepts, as (test, words for the error). YAML values reach the config
# without the CLI's argument checks, so the config itself refuses what would fail later, mid-run.
_POSITIVE = (lambda v: v > 0, "a positive number")
_AT_LEAST_ONE = (lambda v: v >= 1, "an integer >= 1")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
# The seed feeds random.Random, torch.manual_seed (up to 2**64), numpy (taken mod 2**32) and
# numpy's default_rng (non-negative only); [0, 2**63) suits all of them, with room for seed + epoch.
SEED_LIMIT = 2**63
_SEED = (lambda v: 0 <= v < SEED_LIMIT, "an integer in [0, 2**63)")

_TYPE_WORDS = {"bool": ("true or false", "true/false values"), "int": ("an integer", "integers"),
               "float": ("a finite number", "finite numbers"), "str": ("a string", "strings")}


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _is_type(v: Any, typ: str) -> bool:
    if typ == "bool":
        return isinstance(v, bool)
    if typ == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if typ == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)
    return isinstance(v, str)


def _field_type(f) -> tuple[list[str] | str, bool, bool]:
    """(element type(s), is a tuple, accepts None) of a dataclass field, from its declared type:
    'int', 'str | None', 'tuple[int, int]' (a list of two types), 'tuple[str, ...]' (one type)."""
    typ = str(f.type).replace(" ", "")
    optional = typ.endswith("|None")
    typ = typ.removesuffix("|None")
    if typ.startswith("tuple["):
        inner = typ[len("tuple["):-1].split(",")
        return (inner[0] if inner[-1] == "..." else inner), True, optional
    return typ, False, optional


def _accepted_words(f) -> str:
    elems, is_tuple, optional = _field_type(f)
    if not is_tuple:
        words = _TYPE_WORDS[elems][0]
    elif isinstance(elems, str):
        words = f"a list of {_TYPE_WORDS[elems][1]}"
    else:
        kinds = set(elems)
        plural = _TYPE_WORDS[elems[0]][1] if len(kinds) == 1 else "values"
        default = f.default if f.default is not dataclasses.MISSING else None
        words = f"a list of {len(elems)} {plural}" + (f", e.g. {list(default)}" if default else "")
    return words + (", or null" if optional else "")


def _check_types(obj: Any, section: str) -> None:
    """Every field holds its declared type (tuples of the declared length, finite floats), so a
    wrong YAML value is one line naming `section.key` rather than a traceback or a silent misreading."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        elems, is_tuple, optional = _field_type(f)
        if value is None:
            ok = optional
        elif is_tuple:
            ok = isinstance(value, tuple) and (
                all(_is_type(v, elems) for v in value) if isinstance(elems, str)
                else len(value) == len(elems) and all(_is_type(v, t) for v, t in zip(value, elems)))
        else:
            ok = _is_type(value, elems)
        if not ok:
            shown = "null" if value is None else repr(list(value) if isinstance(value, tuple) else value)
            hint = (" (YAML reads unquoted yes/no/on/off as true/false: quote the word)"
                    if isinstance(value, bool) and elems == "str" else "")
            raise UserError(f"config {section}.{f.name}: {shown}; accepted: {_accepted_words(f)}{hint}")


def _check_ranges(obj: Any, section: str, rules: dict[str, tuple[Any, str]]) -> None:
    for name, (ok, accepted) in rules.items():
        value = getattr(obj, name)
        values = value if isinstance(value, tuple) else (value,)
        if value is not None and not all(_finite(v) and ok(v) for v in values):
            raise UserError(f"config {section}.{name}: {value!r}; accepted: {accepted}")


@dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] = ()
    val_fraction: float = 0.15
    test_fraction: float = 0.15  # only used when a source has no test split of its own
    split_file: str | None = None  # a committed split (CSV with key and split columns; path, label, group optional) that overrides splitting
    skip_bad_images: bool = False
    num_workers: int = 0

    def __post_init__(self):
        _check_types(self, "data")
        _check_ranges(self, "data", {"val_fraction": _FRACTION, "test_fraction": _FRACTION,
                                     "num_workers": _NON_NEGATIVE})
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError(f"config data.val_fraction + data.test_fraction: {self.val_fraction} + "
                            f"{self.test_fraction}; accepted: a sum below 1, leaving images to train on")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = SEED_BACKBONE
    pretrained: bool = True
    weights: str | None = None  # a local state dict / safetensors file for the backbone
    allow_random_init: bool = False
    image_size: int | None = None  # None: the backbone's pretrained input size
    resize_mode: str = "crop"  # "crop": short side + centre crop; "squash": resize to square
    # "shades_of_gray": per-image colour constancy before standardising (preprocess.py), saved
    # with the preprocessing so that evaluation and serving apply it too; "none": off.
    color_constancy: str = "none"
    hidden: tuple[int, int] = (512, 256)
    dropout: tuple[float, float] = (0.45, 0.35)

    def __post_init__(self):
        _check_types(self, "model")
        _check_ranges(self, "model", {"image_size": (lambda v: v >= 16, "an integer >= 16 (pixels)"),
                                      "hidden": _AT_LEAST_ONE, "dropout": _FRACTION})
        for name, accepted in (("resize_mode", RESIZE_MODES), ("color_constancy", COLOR_CONSTANCY)):
            if getattr(self, name) not in accepted:
                raise UserError(f"config model.{name}: {getattr(self, name)!r} is not one of {', '.join(accepted)}")


@dataclass(frozen=True)
class TrainConfig:
    epochs_frozen: int = 25
    epochs_finetune: int = 35
    lr_frozen: float = 1e-3
    lr_finetune: float = 1e-5
    batch_size: int = 32
    # Keras' kernel_regularizer=l2(l2) on the two hidden Dense layers adds l2 * sum(w^2) to the
    # loss; its gradient is 2 * l2 * w, i.e. Adam(weight_decay=2 * l2) on those weights only.
    l2: float = 1e-3
    unfreeze_fraction: float = 0.3
    # Layer-wise LR decay in phase 2: each unfrozen backbone unit below the top one trains at
    # layer_decay times the LR of the unit above it (models/factory.py); 1 turns it off.
    layer_decay: float = 1.0
    class_weights: bool = True
    early_stopping_patience: int = 8
    reduce_lr_patience: int = 3
    reduce_lr_factor: float = 0.2
    min_lr: float = 1e-7
    # "plateau": Keras' ReduceLROnPlateau, as in the seed. "cosine": each phase anneals its LR
    # from lr_* to min_lr over its epochs (a function of the epoch, so --resume continues it).
    lr_schedule: str = "plateau"
    # "standard": random resized crop, flips, 90-degree rotations, mild colour jitter.
    # "strong": also wider colour jitter, occasional blur and a random erased patch (cutout).
    # "acquisition": standard plus what differs between dermatoscopes and cameras: white balance
    # (independent per-channel gains), occasional blur and JPEG re-compression.
    augmentation: str = "standard"
    feature_cache: bool = True  # phase 1 on cached pooled features of the frozen backbone
    flip_average: bool = False  # average cached features over a horizontal flip
    feature_engine: str = "auto"  # frozen-part passes: auto | torch | onnxruntime (auto: ORT on CPU if installed)
    phase2_mode: str = "auto"  # auto | plain | cached ("auto": plain; cached is cheaper but memorises its views)
    cache_views: int = 4  # augmented views per image for the cached phase 2
    cache_dihedral: bool = False  # random flips/90-degree rotations of cached feature maps
    cache_dir: str | None = None  # default: $MELANOMA_CACHE, else ~/.cache/melanoma-detector
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | off ("auto": bf16 (else fp16) on CUDA, off on CPU)
    compile: bool = False  # torch.compile the trained module (GPU; minutes of compile time)
    threads: int | None = None
    max_steps_per_epoch: int | None = None  # for smoke runs
    seed: int = 42
    # Knowledge distillation: run folders or model bundles whose mean logit on each training image becomes a soft
    # target (training/distill.py); weight of the soft term and the softening temperature.
    distill_from: tuple[str, ...] = ()
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    # Weight of the auxiliary diagnosis cross-entropy (training/auxiliary.py); 0 turns it off.
    aux_diagnosis_weight: float = 0.0
    # Phase 2 validates, keeps and ships an exponential moving average of the weights with this
    # decay per step (training/ema.py); 0 turns it off.
    ema_decay: float = 0.0
    # Phase 2 (plain) blends a share `mix_prob` of the batches with a shuffled copy: "mixup" or
    # "cutmix", lam ~ Beta(mix_alpha, mix_alpha) (training/mixing.py); "none" turns it off.
    mix: str = "none"
    mix_alpha: float = 0.4
    mix_prob: float = 0.5
    # Weight of a pairwise ranking term (training/engine.py pairwise_rank_loss: a smooth
    # surrogate of 1 - AUC over the batch's melanoma/benign pairs) added to the loss; 0 turns it off.
    rank_weight: float = 0.0
    # Stochastic depth in the backbone's residual blocks, rising linearly to this rate at the last
    # block (models/factory.py apply_drop_path); 0 turns it off.
    drop_path: float = 0.0

    def __post_init__(self):
        _check_types(self, "train")
        for name, accepted in (("phase2_mode", ("auto", "plain", "cached")), ("amp", ("auto", "bf16", "fp16", "off")),
                               ("device", ("auto", "cpu", "cuda", "mps")),
                               ("feature_engine", ("auto", "torch", "onnxruntime")),
                               ("lr_schedule", LR_SCHEDULES), ("augmentation", AUGMENTATIONS), ("mix", MIX_KINDS)):
            if getattr(self, name) not in accepted:
                raise UserError(f"config train.{name}: {getattr(self, name)!r} is not one of {', '.join(accepted)}")
        _check_ranges(self, "train", {
            "epochs_frozen": _NON_NEGATIVE, "epochs_finetune": _NON_NEGATIVE, "lr_frozen": _POSITIVE,
            "lr_finetune": _POSITIVE, "batch_size": (lambda v: v >= 2, "an integer >= 2 (BatchNorm cannot train on one image)"), "l2": _NON_NEGATIVE,
            "unfreeze_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"), "early_stopping_patience": _AT_LEAST_ONE,
            "reduce_lr_patience": _NON_NEGATIVE, "reduce_lr_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
            "min_lr": _NON_NEGATIVE, "cache_views": _AT_LEAST_ONE, "threads": _AT_LEAST_ONE,
            "max_steps_per_epoch": _AT_LEAST_ONE, "seed": _SEED})
        if not 0 <= self.distill_weight <= 1:
            raise UserError(f"config train.distill_weight: {self.distill_weight} is not between 0 and 1")
        if not self.distill_temperature > 0:
            raise UserError(f"config train.distill_temperature: {self.distill_temperature} is not a positive number")
        if not 0 <= self.aux_diagnosis_weight <= 10:
            raise UserError(f"config train.aux_diagnosis_weight: {self.aux_diagnosis_weight} is not between 0 and 10")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"config train.ema_decay: {self.ema_decay} is not in [0, 1) (0 = off; e.g. 0.999)")
        if not 0 < self.layer_decay <= 1:
            raise UserError(f"config train.layer_decay: {self.layer_decay} is not in (0, 1] (1 = off; e.g. 0.85)")
        if not self.mix_alpha > 0:
            raise UserError(f"config train.mix_alpha: {self.mix_alpha} is not a positive number (e.g. 0.4)")
        if not 0 < self.mix_prob <= 1:
            raise UserError(f"config train.mix_prob: {self.mix_prob} is not in (0, 1]")
        if not 0 <= self.drop_path < 1:
            raise UserError(f"config train.drop_path: {self.drop_path} is not in [0, 1) (0 = off; e.g. 0.2)")
        if not 0 <= self.rank_weight <= 10:
            raise UserError(f"config train.rank_weight: {self.rank_weight} is not between 0 and 10 (0 = off; e.g. 0.5)")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(typ: str, value: Any) -> Any:
    """`value` as `typ` where it is a spelling of one (a YAML/CLI string, 32.0 for an int); else
    unchanged, for _check_types to refuse with the field's name."""
    if typ == "bool" and isinstance(value, str):
        return True if value.lower() in _TRUE else False if value.lower() in _FALSE else value
    if typ == "bool" and not isinstance(value, bool) and isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)  # 0/1 as the strings "0"/"1" are
    if typ not in ("int", "float") or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return value
    if typ == "int" and isinstance(value, int):
        return value
    if typ == "int" and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    try:
        number = float(value)  # PyYAML reads 1e-3 and 1e3 (no dot) as strings
    except (ValueError, OverflowError):
        return value
    if typ == "float":
        return number
    return int(number) if number.is_integer() else value  # 32.0 or '1e3' for an int


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Turn YAML/CLI values into the field's declared type (tuples stay tuples: frozen); what is not
    a spelling of that type stays as given and the dataclass refuses it."""
    f = {f.name: f for f in fields(cls)}[name]
    elems, is_tuple, _ = _field_type(f)
    if value is None:
        return None
    if not is_tuple:
        return _convert(elems, value)
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)):
        value = [value]
    return tuple(_convert(elems if isinstance(elems, str) else elems[min(i, len(elems) - 1)], v)
                 for i, v in enumerate(value))


def _build_section(cls: type, values: Mapping[str, Any], section: str):
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UserError(
            f"unknown config key(s) in '{section}': {', '.join(sorted(unknown))}; "
            f"accepted: {', '.join(sorted(known))}"
        )
    return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})


def config_from_dict(values: Mapping[str, Any] | None) -> Config:
    values = dict(values or {})
    unknown = set(values) - set(_SECTIONS)
    if unknown:
        raise UserError(
            f"unknown config section(s): {', '.join(sorted(unknown))}; accepted: data, model, train"
        )
    return Config(
        **{
            name: _build_section(cls, values.get(name) or {}, name)
            for name, cls in _SECTIONS.items()
        }
    )


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load YAML (optional) then apply `overrides` given as {"section.key": value}."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p} (expected a YAML file)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {p} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p} must hold a mapping with data/model/train sections")
        bad = [k for k, v in loaded.items() if v is not None and not isinstance(v, dict)]
        if bad:
            raise UserError(f"config file {p}: {bad[0]!r} is not a section of options; accepted: sections data, "
                            "model and train, each a mapping of option: value")
        values = {k: dict(v or {}) for k, v in loaded.items()}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        values.setdefault(section, {})[key] = value
    return config_from_dict(values)


def training_data_paths(config: Mapping[str, Any] | None) -> list[str]:
    """The data folders of a saved training config (a checkpoint's "config" dict), where a keys-only
    split file finds its images."""
    return list(((config or {}).get("data") or {}).get("paths") or [])


def save_config(config: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
