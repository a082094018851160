"""`melanoma` command line. Thin: parse arguments, call one function per subcommand.

Any UserError (bad path, bad flag value, bad data) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from melanoma_detector import DISCLAIMER, __version__
from melanoma_detector.config import AUGMENTATIONS, EVAL_SPLITS, LR_SCHEDULES, MIX_KINDS, RECALIBRATION_GATES
from melanoma_detector.errors import UserError


class _Parser(argparse.ArgumentParser):
    """One-line errors: the message and where to read more, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (the seed's two-phase recipe)",
                       description="Train with the seed's two-phase recipe. Under torchrun "
                                   "(`torchrun --nproc_per_node=N -m melanoma_detector train ...`) it trains with "
                                   "DistributedDataParallel; --batch-size is per process.")
    p.add_argument("--data", action="append", metavar="ROOT_OR_MANIFEST",
                   help="data folder or CSV manifest; repeat to combine several sets")
    p.add_argument("--out", help="run folder (config, split, metrics, plots, checkpoint)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last finished epoch (uses the run's saved config)")
    p.add_argument("--config", help="YAML config; flags below override it")
    p.add_argument("--backbone", help="any timm model name (default: efficientnet_b3, the seed's)")
    p.add_argument("--weights", help="local backbone weights: state dict (.pth) or .safetensors")
    p.add_argument("--allow-random-init", action="store_true", default=None,
                   help="train from random weights when no ImageNet weights can be had")
    p.add_argument("--no-pretrained", action="store_true", default=None, help="random initialisation on purpose")
    p.add_argument("--image-size", type=_positive_int)
    p.add_argument("--resize-mode", choices=["crop", "squash"])
    p.add_argument("--color-constancy", choices=["none", "shades_of_gray"],
                   help="per-image colour constancy (Shades of Grey, p = 6) before standardising; saved with the "
                        "model, so evaluation and serving apply it too (default none)")
    p.add_argument("--epochs-frozen", type=_non_negative_int)
    p.add_argument("--epochs-finetune", type=_non_negative_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr-frozen", type=float)
    p.add_argument("--lr-finetune", type=float)
    p.add_argument("--unfreeze-fraction", type=float)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help="plateau (default): reduce the LR when val AUC stalls, as in the seed; cosine: anneal "
                        "each phase's LR to train.min_lr over its epochs")
    p.add_argument("--augmentation", choices=AUGMENTATIONS,
                   help="strong adds wider colour jitter, occasional blur and a random erased patch; acquisition "
                        "adds white-balance gains per channel, occasional blur and JPEG re-compression")
    p.add_argument("--phase2-mode", choices=["auto", "plain", "cached"],
                   help="plain (auto): fresh augmentation every epoch; cached: stored views of the frozen "
                        "part, ~6x cheaper per epoch but memorised within a few epochs")
    p.add_argument("--cache-views", type=_positive_int)
    p.add_argument("--cache-dihedral", action="store_true", default=None,
                   help="cached phase 2: also flip/rotate the cached feature maps at random")
    p.add_argument("--cache-dir")
    p.add_argument("--split-file", help="a saved split.csv to reuse instead of splitting")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision (default auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the trained module")
    p.add_argument("--threads", type=_positive_int)
    p.add_argument("--workers", type=_non_negative_int, help="DataLoader worker processes")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-steps-per-epoch", type=_positive_int, help="cap steps per epoch (smoke runs)")
    p.add_argument("--distill-from", nargs="+", metavar="RUN_OR_BUNDLE",
                   help="knowledge distillation: also train towards the mean logit of these trained runs or model "
                        "bundles (teachers trained on the same split) on each training image")
    p.add_argument("--distill-weight", type=float, help="weight of the teachers' soft targets, 0-1 (default 0.5)")
    p.add_argument("--distill-temperature", type=float, help="softening temperature for distillation (default 2)")
    p.add_argument("--aux-diagnosis-weight", type=float, metavar="W",
                   help="also train a diagnosis-class layer (labels.csv `dx`: nevus, keratosis, ...) with this loss "
                        "weight, 0-10 (default 0: off); training only, the saved model is unchanged in form")
    p.add_argument("--ema-decay", type=float, metavar="D",
                   help="phase 2: validate, keep and ship an exponential moving average of the weights, D per step "
                        "(e.g. 0.999; default 0: off)")
    p.add_argument("--layer-decay", type=float, metavar="D",
                   help="phase 2: each unfrozen backbone unit trains at D times the LR of the unit above it, 0-1 "
                        "(e.g. 0.85; default 1: off)")
    p.add_argument("--mix", choices=MIX_KINDS,
                   help="plain phase 2: blend a share of the batches with a shuffled copy of themselves (default none)")
    p.add_argument("--mix-alpha", type=float, metavar="A", help="Beta(A, A) for the blend weight (default 0.4)")
    p.add_argument("--mix-prob", type=float, metavar="P", help="share of the batches mixed, 0-1 (default 0.5)")
    p.add_argument("--rank-weight", type=float, metavar="W",
                   help="add W times a pairwise ranking loss (a smooth surrogate of 1 - AUC over each batch's "
                        "melanoma/benign pairs), 0-10 (default 0: off)")
    p.add_argument("--drop-path", type=float, metavar="R",
                   help="stochastic depth: drop each residual block's branch per sample, with a probability "
                        "rising to R at the backbone's last block, 0-1 (e.g. 0.2; default 0: off)")
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="skip unreadable images (and report how many) instead of stopping")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


# Options that change how a run executes, not what it computes: the only ones --resume accepts.
_RUNTIME_TRAIN_OPTIONS = {"device": "train.device", "threads": "train.threads", "workers": "data.num_workers"}


def cmd_train(args) -> int:
    from melanoma_detector.config import load_config
    from melanoma_detector.training.trainer import run_training

    if args.resume:
        # Given means not None: every train option but --no-progress defaults to None, so that 0, 0.0 and
        # the store_true flags count as given too.
        fixed = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                 if v is not None and k not in (*_RUNTIME_TRAIN_OPTIONS, "resume", "no_progress", "func",
                                                "command", "verbose")]
        if fixed:
            raise UserError(f"--resume continues a run with its saved config.yaml; drop {', '.join(sorted(fixed))} "
                            f"(accepted with --resume: --device, --threads, --workers, --no-progress)")
        runtime = {key: getattr(args, name) for name, key in _RUNTIME_TRAIN_OPTIONS.items()}
        try:
            summary = run_training(None, args.resume, progress=not args.no_progress, resume=True, runtime=runtime)
        except KeyboardInterrupt:
            _resume_hint(args.resume)
            raise
        _print_train_summary(summary)
        return 0
    overrides = {
        "data.paths": args.data,
        "data.split_file": args.split_file,
        "data.skip_bad_images": args.skip_bad_images,
        "data.num_workers": args.workers,
        "model.backbone": args.backbone,
        "model.weights": args.weights,
        "model.allow_random_init": args.allow_random_init,
        "model.pretrained": False if args.no_pretrained else None,
        "model.image_size": args.image_size,
        "model.resize_mode": args.resize_mode,
        "model.color_constancy": args.color_constancy,
        "train.epochs_frozen": args.epochs_frozen,
        "train.epochs_finetune": args.epochs_finetune,
        "train.batch_size": args.batch_size,
        "train.lr_frozen": args.lr_frozen,
        "train.lr_finetune": args.lr_finetune,
        "train.unfreeze_fraction": args.unfreeze_fraction,
        "train.layer_decay": args.layer_decay,
        "train.lr_schedule": args.lr_schedule,
        "train.augmentation": args.augmentation,
        "train.phase2_mode": args.phase2_mode,
        "train.cache_views": args.cache_views,
        "train.cache_dihedral": args.cache_dihedral,
        "train.cache_dir": args.cache_dir,
        "train.device": args.device,
        "train.amp": args.amp,
        "train.compile": args.compile,
        "train.threads": args.threads,
        "train.seed": args.seed,
        "train.max_steps_per_epoch": args.max_steps_per_epoch,
        "train.distill_from": args.distill_from,
        "train.distill_weight": args.distill_weight,
        "train.distill_temperature": args.distill_temperature,
        "train.aux_diagnosis_weight": args.aux_diagnosis_weight,
        "train.ema_decay": args.ema_decay,
        "train.mix": args.mix,
        "train.mix_alpha": args.mix_alpha,
        "train.mix_prob": args.mix_prob,
        "train.rank_weight": args.rank_weight,
        "train.drop_path": args.drop_path,
    }
    if not args.out:
        raise UserError("train needs --out (a new run folder), or --resume RUN_DIR to continue an interrupted run")
    # The config first: a run's saved config.yaml holds its data.paths, so it repeats the run without --data.
    config = load_config(args.config, overrides)
    if not config.data.paths:
        raise UserError("train needs --data (or data.paths in the --config file); accepted: a data folder or CSV "
                        "manifest, repeated to combine several")
    if not 0 <= config.train.unfreeze_fraction <= 1:
        raise UserError(f"--unfreeze-fraction {config.train.unfreeze_fraction}: accepted 0 to 1")
    _refuse_out_inside_data(args.out, config.data.paths)
    try:
        summary = run_training(config, args.out, progress=not args.no_progress)
    except KeyboardInterrupt:
        _resume_hint(args.out)
        raise
    _print_train_summary(summary)
    return 0


def _resume_hint(out: str) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    if (Path(out) / "config.yaml").is_file():
        print(f"the run is kept up to its last finished epoch; continue it with: melanoma train --resume {out}",
              file=sys.stderr)
    else:
        print("stopped before training began; nothing to resume: run the same command again", file=sys.stderr)


def _refuse_out_inside_data(out: str, data: list[str]) -> None:
    """A run folder inside a data folder puts config.yaml, split.csv and plots among the images, where every later
    `train` on that data refuses them as bad images."""
    where = Path(os.path.realpath(os.path.expanduser(out)))
    for d in data:
        root = Path(os.path.realpath(os.path.expanduser(str(d))))
        if root.is_dir() and (where == root or root in where.parents):
            raise UserError(f"--out {out}: inside the data folder {d}, where the run's files would be read as images; "
                            "accepted: a run folder outside every --data folder")


def _print_train_summary(summary) -> None:
    if summary is None or os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks
        return
    def num(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    best = summary["best"]
    print(f"best val AUC {num(best['val_auc'])} ({best['phase']} epoch {best['epoch']}); run folder: "
          f"{summary['out_dir']}")
    for split, m in summary["metrics"].items():
        print(f"{split}: AUC {num(m['roc_auc'])}, sensitivity {num(m['sensitivity'])}, specificity "
              f"{num(m['specificity'])} at screening threshold {summary['thresholds']['screening']:.3f}")
    print(DISCLAIMER)


def _make_predictor(model: str | None, *, tta: bool = False):
    """A bundle (default: the shipped one) goes through the torch-free Predictor; a checkpoint
    (.pt or run folder) through torch."""
    from melanoma_detector.inference.bundle import default_bundle_dir, is_bundle_path

    path = Path(model) if model else default_bundle_dir()
    if model is not None and not path.exists():
        raise UserError(f"--model {path}: not found; accepted: a bundle folder, a checkpoint (.pt) or a run folder")
    if model is None and not is_bundle_path(path):
        raise UserError(f"no default model bundle at {path} (the shipped one is models/default in a clone of the "
                        "repository; a wheel does not carry it, but finds it when run from the clone's folder); accepted: --model (a bundle folder, "
                        "checkpoint or run folder), or MELANOMA_MODEL=BUNDLE_FOLDER")
    if is_bundle_path(path):
        from melanoma_detector.inference.predictor import Predictor

        predictor = Predictor(path)
        if tta:
            _orig = predictor.predict_paths
            predictor.predict_paths = lambda paths, **kw: _orig(paths, tta=True, **kw)
        return predictor
    if tta:
        raise UserError("--tta needs a model bundle (melanoma export); checkpoints are scored without TTA")
    from melanoma_detector.models.torch_predictor import TorchPredictor

    return TorchPredictor(model)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="report (HTML + JSON) with confidence intervals on labelled test sets",
                       description="Score one or more labelled test sets and write report.html (self-contained), "
                                   "metrics.json, predictions.csv and the plots. 95% CIs by bootstrap, resampled "
                                   "by lesion group when the data names groups. " + DISCLAIMER)
    p.add_argument("--model", help="bundle folder (default: $MELANOMA_MODEL, else the shipped models/default), checkpoint (.pt) or run folder")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations (bundles only)")
    p.add_argument("--data", action="append", required=True, metavar="PATH",
                   help="class folders, a root with test/ (else val/), or a CSV manifest; repeat for several sets")
    p.add_argument("--split-file", help="a run's split.csv: evaluate each --data on its test (else val) split")
    p.add_argument("--split", choices=EVAL_SPLITS,
                   help="score this split of split folders / a split file instead of test (else val); val is where "
                        "a bundle's calibration and thresholds were fitted, so its figures there are optimistic; "
                        "all: every image, e.g. a whole external collection")
    p.add_argument("--out", help="output folder (default: ./evaluation)")
    p.add_argument("--prevalence", type=float, metavar="P",
                   help="also report PPV/NPV re-weighted to this melanoma prevalence (0 < P < 1, e.g. 0.02)")
    p.add_argument("--compare", metavar="OTHER_MODEL",
                   help="a second bundle or checkpoint scored on the same sets, side by side with DeLong's test")
    p.add_argument("--resamples", type=_positive_int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from melanoma_detector.evaluation.evaluate import check_report_target, evaluate_model, load_eval_sets
    from melanoma_detector.evaluation.report import format_summary
    from melanoma_detector.inference.bundle import default_bundle_dir

    if args.prevalence is not None and not 0 < args.prevalence < 1:
        raise UserError(f"--prevalence {args.prevalence}: expected a fraction between 0 and 1 (e.g. 0.02)")
    out = check_report_target(args.out or "evaluation")
    split_file = args.split_file or _run_split_for(args.model, args.data)
    if split_file and not args.split_file:
        print(f"scoring the run's own {args.split or 'test'} split ({split_file}) of the data it trained on; "
              "--split all scores every image")
    # Bad data fails before any model is loaded.
    sets = load_eval_sets(args.data, split_file=split_file, split=args.split)
    predictor = _make_predictor(args.model, tta=args.tta)
    other = _make_predictor(args.compare, tta=args.tta) if args.compare else None
    results = evaluate_model(
        predictor, sets, out_dir=out, progress=not args.no_progress, compare=other,
        prevalence=args.prevalence, n_resamples=args.resamples, seed=args.seed,
        model_source=args.model or default_bundle_dir(), compare_source=args.compare, tta=args.tta,
    )
    print(format_summary(results))
    print(f"report: {out / 'report.html'}  (metrics.json, predictions.csv and plots in {out})")
    print(DISCLAIMER)
    return 0


def _run_split_for(model: str | None, data: list[str]) -> str | None:
    """A run evaluated on exactly the data folders it trained on: its split.csv, so that its test split is scored
    rather than every image (mostly its own training images) under a warning."""
    if not model:
        return None
    run = Path(model) if Path(model).is_dir() else Path(model).parent
    split, config = run / "split.csv", run / "config.yaml"
    if not (split.is_file() and config.is_file()):
        return None
    import yaml

    try:
        trained = ((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data") or {}).get("paths") or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return None
    real = {os.path.realpath(os.path.expanduser(str(p))) for p in trained}
    if data and all(os.path.realpath(os.path.expanduser(d)) in real for d in data):
        return str(split)
    return None


def _collect_images(paths: list[str]) -> list[str]:
    from melanoma_detector.data.io import is_image_file

    files: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise UserError(f"{p}: folder holds no images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp)")
            files.extend(found)
        elif p.exists():
            files.append(str(p))  # any file: a non-image gets status cannot_assess, not a crash
        else:
            raise UserError(f"{p}: no such file or folder")
    return files


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="probability of melanoma for images or folders",
                       description="Score images. Small jobs print a table (and --csv/--json); large jobs "
                                   "(--out) stream rows to a CSV or Parquet file with parallel decoding and --resume.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--manifest", action="append", default=[], metavar="FILE",
                   help="CSV with a path (or image/filepath) column, or a text file with one path per line; "
                        "relative paths are resolved against its folder; repeatable")
    p.add_argument("--model", help="bundle folder (default: $MELANOMA_MODEL, else the shipped models/default), checkpoint (.pt) or run folder")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations")
    p.add_argument("--csv", help="write results to this CSV file")
    p.add_argument("--json", nargs="?", const="-", help="write results as JSON (to a file, or stdout)")
    p.add_argument("--out", metavar="FILE.csv|FILE.parquet",
                   help="large jobs: stream results to this file (format by extension; Parquet needs the "
                        "'batch' extra), flushed as it goes, with bounded memory; prints a summary, not a table")
    p.add_argument("--resume", action="store_true",
                   help="with --out: continue an existing output, skipping the images already in it")
    p.add_argument("--workers", type=_non_negative_int, metavar="N",
                   help="with --out: decode in N worker processes (default: min(2, CPUs); 0 = in this process)")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per model call (default 16)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)


def _predict_to_file(args) -> int:
    from melanoma_detector.inference.batch import iter_inputs, open_output, predict_to_file

    if args.csv or args.json:
        raise UserError("--out writes the results file itself; use --out, or --csv/--json for small jobs, not both")
    paths = iter_inputs(args.paths, args.manifest)  # missing inputs fail here, before the model loads
    first = next(paths, None)  # and a manifest that lists nothing, as without --out
    if first is None:
        raise UserError(f"{', '.join(args.manifest)}: the manifest lists no images")
    paths = itertools.chain([first], paths)
    open_output(args.out, resume=args.resume)  # so does an output that exists without --resume
    predictor = _make_predictor(args.model, tta=args.tta)
    try:
        s = predict_to_file(predictor, paths, args.out, workers=args.workers, batch_size=args.batch_size,
                            tta=args.tta, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"the rows scored so far are saved ({args.out}); add --resume to the same command to continue",
              file=sys.stderr)
        raise
    print(f"{s['processed']} images scored ({s['ok']} ok, {s['cannot_assess']} cannot assess) in "
          f"{s['seconds']:.1f} s ({s['images_per_s']:.1f} images/s); {s['skipped']} skipped as already in "
          f"the output or listed twice; results: {s['out']}")
    print(DISCLAIMER)
    return 1 if s["processed"] and not s["ok"] else 0


def _check_output_file(flag: str, path: str | None) -> None:
    """Before any image is scored, so that a bad name never costs the job's work: a folder is refused,
    and a missing parent folder is made, as --out does."""
    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a folder; accepted: a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {p}: cannot make its folder ({e.strerror}); accepted: a file in a writable "
                        "folder") from None
    from melanoma_detector.data.io import IMAGE_EXTENSIONS

    if p.suffix.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"{flag} {p}: an image file name; the results would replace it; accepted: a results file name "
                        f"such as out{'.json' if flag == '--json' else '.csv'}")
    # A probe, because root ignores permission bits and /proc or a read-only mount passes os.access. Only a regular
    # file or a new name is probed: opening a FIFO would hand its reader an EOF, and a dangling link would create
    # its target; those (and devices such as /dev/stdout) are written as they are.
    try:
        if p.is_symlink() or (p.exists() and not p.is_file()):
            return
        if p.exists():
            with open(p, "a"):  # append: the file's contents stay until the results replace them
                pass
        else:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            p.unlink()
    except OSError as e:
        raise UserError(f"{flag} {p}: not writable ({e.strerror}); accepted: a file in a writable folder") from None


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def _printable(text: str) -> str:
    """One table cell on any terminal: a file name's undecodable bytes and control characters (newlines, and
    the escape sequences a name could use to recolour or rewrite the terminal) as backslash escapes."""
    from melanoma_detector.fileio import escape_undecodable

    return escape_undecodable(text).translate(_CONTROL)


def cmd_predict(args) -> int:
    import csv

    if not args.paths and not args.manifest:
        raise UserError("nothing to score: give image files or folders, or --manifest FILE")
    for flag, values in (("a path", args.paths), ("--manifest", args.manifest), ("--out", [args.out]),
                         ("--csv", [args.csv]), ("--json", [args.json])):
        if any(v == "" for v in values or ()):  # Path("") is the current folder: an unset $VAR must not mean "."
            raise UserError(f"{flag} is empty (an unset variable?); accepted: a file or folder name")
    if args.out:
        return _predict_to_file(args)
    if args.resume or args.workers is not None:
        raise UserError("--resume and --workers apply to --out runs (streamed to a file); add --out FILE.csv")
    for flag, target in (("--csv", args.csv), ("--json", args.json)):
        _check_output_file(flag, target)
    files = _collect_images(args.paths)
    if args.manifest:
        from melanoma_detector.inference.batch import iter_inputs

        files.extend(iter_inputs((), args.manifest))
    if not files:
        raise UserError(f"{', '.join(args.manifest)}: the manifest lists no images")
    predictor = _make_predictor(args.model, tta=args.tta)
    rows = predictor.predict_paths(files, batch_size=args.batch_size, progress=not args.no_progress and len(files) > 1)
    if args.csv:
        from melanoma_detector.inference.batch import CSV_COLUMNS, csv_row

        # UTF-8 whatever the locale, and a file name that is not UTF-8 keeps its bytes (as `--out` does); a path
        # that would open as a spreadsheet formula (`=...`) gets a leading `'` (as `--out` does; JSON keeps it raw)
        with open(args.csv, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows(csv_row(r) for r in rows)
    if args.json:
        payload = json.dumps({"disclaimer": DISCLAIMER, "results": rows}, indent=2)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload)
    if args.json != "-":
        shown = [_printable(r["path"]) for r in rows]
        width = max(map(len, shown))
        print(f"{'path':<{width}}  {'p(malignant)':>12}  {'label':<9}  risk")
        for r, path in zip(rows, shown):
            if r["status"] == "ok":
                print(f"{path:<{width}}  {r['probability_malignant']:>12.4f}  {r['predicted_label']:<9}  {r.get('risk_level') or '-'}")
            else:
                print(f"{path:<{width}}  {'-':>12}  cannot assess: {_printable(r['reason'])}")
        print(DISCLAIMER)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="inspect a data set")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{check}")
    c = dsub.add_parser("check", help="counts, sizes, unreadable files, duplicates, leakage")
    c.add_argument("root", help="data folder or CSV manifest")
    c.add_argument("--out", help="report folder (default: ./data-check-<name>)")
    c.add_argument("--near-threshold", type=_non_negative_int, default=4, help="pHash Hamming distance (default 4)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_data_check)


def cmd_data_check(args) -> int:
    from melanoma_detector.data.check import check_dataset, format_summary

    out = args.out or f"data-check-{Path(args.root).resolve().name}"
    report = check_dataset(args.root, out_dir=out, near_threshold=args.near_threshold, progress=not args.no_progress)
    print(format_summary(report))
    return 1 if report.get("leakage") else 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="build a model bundle (ONNX + metadata + model card) from a checkpoint")
    p.add_argument("--model", required=True, nargs="+", metavar="CKPT",
                   help="checkpoint (.pt) or run folder; several export their mean-logit ensemble as one graph "
                        "(same preprocessing required)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--split", help="split whose val/test images finish the bundle: a run's split.csv, or a keys-only "
                                   "--split-file whose images are found in the data folders the first model trained "
                                   "on (default: the first run's split.csv)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the bundle already in --out (only once the new one is complete)")
    p.add_argument("--no-data", action="store_true", help="skip calibration/metrics/input-gate statistics on data")
    p.add_argument("--no-fingerprints", action="store_true",
                   help="do not store perceptual hashes of the training and validation images (seen_images.npz), "
                        "with which `melanoma evaluate` finds renamed, resized or re-encoded copies of them")
    p.add_argument("--resamples", type=_positive_int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from melanoma_detector.export.bundle import check_export_target, export_bundle, staged_bundle

    check_export_target(args.out, overwrite=args.overwrite)
    with staged_bundle(args.out) as stage:
        meta = export_bundle(args.model, stage, split_file=args.split, use_data=not args.no_data,
                             n_resamples=args.resamples, seen_fingerprints=not args.no_fingerprints,
                             progress=not args.no_progress)
    test = meta.get("metrics", {}).get("test")
    print(f"bundle written to {args.out} (model {meta['model_version']}, sha256 {meta['graph']['sha256'][:12]})")
    if test:
        auc = test["roc_auc"]
        print(f"test AUC {auc['value']:.4f} (95% CI {auc['ci95'][0]:.4f}-{auc['ci95'][1]:.4f}), "
              f"n={test['n']}; thresholds {meta['thresholds']}")
    return 0


def _add_card(sub) -> None:
    p = sub.add_parser("card", help="re-render a bundle's MODEL_CARD.md, optionally recording an external evaluation",
                       description="Re-render MODEL_CARD.md from the bundle's metadata.json. With --external-eval, "
                                   "first record the figures of `melanoma evaluate` runs on collections the evaluated "
                                   "model never trained on (the graph is not touched).")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by `melanoma export`")
    p.add_argument("--external-eval", nargs="+", default=[], metavar="EVAL_DIR",
                   help="output folder(s) of `melanoma evaluate --out`")
    p.add_argument("--note", help="how the evaluated model relates to this bundle; required when it is not the "
                                  "bundle itself (e.g. 'the same recipe trained on HAM10000 alone')")
    p.add_argument("--fingerprint-split", metavar="SPLIT",
                   help="first give a bundle exported before fingerprints its seen_images.npz: perceptual hashes of "
                        "the train and val images of SPLIT, the split file its models trained on (checked against "
                        "the bundle's record), with which `melanoma evaluate` finds renamed or resized copies")
    p.add_argument("--data", action="append", metavar="PATH",
                   help="data folder where a keys-only --fingerprint-split finds its images (repeatable; default: "
                        "the folders the bundle's models trained on)")
    p.set_defaults(func=cmd_card)


def cmd_card(args) -> int:
    from melanoma_detector.export.external import record_external

    if args.data and not args.fingerprint_split:
        raise UserError("--data: only used with --fingerprint-split; accepted: --fingerprint-split SPLIT --data PATH")
    if args.fingerprint_split:
        from melanoma_detector.export.bundle import fingerprint_bundle

        seen = fingerprint_bundle(args.bundle, args.fingerprint_split, data_paths=args.data)["seen_images"]
        print(f"{Path(args.bundle) / seen['file']} written: {seen['counts']['train']:,} training and "
              f"{seen['counts']['val']:,} validation images fingerprinted")
    meta = record_external(args.bundle, args.external_eval, note=args.note)
    n = len(meta.get("external_validation") or [])
    print(f"{Path(args.bundle) / 'MODEL_CARD.md'} written; {n} external evaluation(s) recorded")
    return 0


def _add_unbundle(sub) -> None:
    p = sub.add_parser("unbundle", help="recover a bundle's torch models as checkpoints (to evaluate, probe, distil "
                                        "from or re-ensemble them)",
                       description="Rebuild the torch model(s) inside a bundle's ONNX graph and write each as a "
                                   "checkpoint: OUT/checkpoint.pt, or OUT/member-I/checkpoint.pt for an ensemble. "
                                   "The recovered models are checked against the graph before anything is written.")
    p.add_argument("--model", help="bundle folder (default: $MELANOMA_MODEL, else the shipped models/default)")
    p.add_argument("--out", required=True, help="folder to write the checkpoint(s) to")
    p.add_argument("--split", help="split to place beside each checkpoint as split.csv: a run's split.csv or a "
                                   "keys-only --split-file such as configs/splits/default.csv (default: the split "
                                   "file the bundle records, when it exists here); written only when the bundle "
                                   "records that its models trained on that split's train images")
    p.add_argument("--data", action="append", metavar="PATH",
                   help="data folder where a keys-only --split finds its images (repeatable; default: the folders "
                        "the bundle's models trained on)")
    p.set_defaults(func=cmd_unbundle)


def cmd_unbundle(args) -> int:
    from melanoma_detector.export.unbundle import write_member_checkpoints

    for d in args.data or ():
        if not Path(d).exists():
            raise UserError(f"--data {d}: not found; accepted: a data folder (or manifest) where --split finds its images")
    for path in write_member_checkpoints(args.model, args.out, split_file=args.split, data_paths=args.data):
        note = "" if (path.parent / "split.csv").is_file() else " (no split.csv: give --split to export or probe it)"
        print(f"{path}{note}")
    return 0


def _holdout_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _add_recalibrate(sub) -> None:
    p = sub.add_parser("recalibrate", help="re-fit a bundle's calibration and thresholds on labelled images of "
                                           "your own source (a new bundle; the graph is unchanged)",
                       description="Copy a bundle with its temperature, bias, screening and high-specificity "
                                   "thresholds re-fitted on labelled images of a new source; whole lesion groups "
                                   "are held out to measure the result against the source bundle's calibration. "
                                   + DISCLAIMER)
    p.add_argument("--model", help="source bundle folder (default: $MELANOMA_MODEL, else the shipped models/default)")
    p.add_argument("--data", action="append", required=True, metavar="PATH",
                   help="labelled images of the target source (class folders, split folders or a CSV manifest; "
                        "every image is used whatever its split); repeat for several")
    p.add_argument("--out", required=True, help="new bundle folder (must not exist or be empty)")
    p.add_argument("--holdout", type=_holdout_fraction, default=0.3,
                   help="fraction of the images (whole lesion groups, stratified) held out to measure the result "
                        "(default 0.3; 0 keeps all for fitting and measures nothing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    p.add_argument("--gate", choices=RECALIBRATION_GATES, default="refit",
                   help="refit (default): also re-fit the input gate's out-of-distribution statistics on these "
                        "images (and acquisition variants of them), since a gate fitted on another collection "
                        "refuses part of a new one; keep: the source bundle's gate, fitting only on the images it "
                        "accepts")
    p.add_argument("--resamples", type=_positive_int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_recalibrate)


def _add_refit_gate(sub) -> None:
    p = sub.add_parser("refit-gate", help="re-fit a bundle's input gate on its validation images and acquisition "
                                          "variants of them (a new bundle; graph and calibration unchanged)",
                       description="Copy a bundle with its input gate (the out-of-distribution check that answers "
                                   "cannot_assess) re-fitted by the current rule: validation images plus "
                                   "acquisition variants of each (colour casts, exposure, blur, JPEG), a covariance "
                                   "shrunk half way to the identity and the 0.995 quantile of held-out distances. "
                                   "For bundles exported before that rule, whose tighter gate refuses much "
                                   "dermoscopy from other devices. " + DISCLAIMER)
    p.add_argument("--model", help="source bundle folder (default: $MELANOMA_MODEL, else the shipped models/default)")
    p.add_argument("--data", action="append", required=True, metavar="PATH",
                   help="the data folders the bundle was trained on; repeat for several")
    p.add_argument("--split-file", required=True,
                   help="the split CSV the bundle was trained with (its validation images fit the gate)")
    p.add_argument("--out", required=True, help="new bundle folder (must not exist or be empty)")
    p.add_argument("--variants", type=int, default=None, metavar="K",
                   help="acquisition variants per validation image (default 2; 0: the images alone)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_refit_gate)


def cmd_refit_gate(args) -> int:
    from melanoma_detector.export.gate import ACQUISITION_VARIANTS, refit_bundle_gate
    from melanoma_detector.inference.bundle import default_bundle_dir

    variants = ACQUISITION_VARIANTS if args.variants is None else args.variants
    meta = refit_bundle_gate(args.model or default_bundle_dir(), args.data, args.out, split_file=args.split_file,
                             variants=variants, progress=not args.no_progress)
    ood = meta["input_gate"]["ood"]
    refused = (meta.get("metrics") or {}).get("test", {}).get("ood_refused_fraction")
    print(f"bundle written to {args.out} (model {meta['model_version']}); gate threshold {ood['threshold']:.2f} "
          f"({ood['threshold_rule']})" + (f"; refuses {refused:.2%} of the test split" if refused is not None else ""))
    return 0


def cmd_recalibrate(args) -> int:
    from melanoma_detector.export.recalibrate import recalibrate_bundle
    from melanoma_detector.inference.bundle import default_bundle_dir

    meta = recalibrate_bundle(args.model or default_bundle_dir(), args.data, args.out, holdout=args.holdout,
                              seed=args.seed, gate=args.gate, n_resamples=args.resamples,
                              progress=not args.no_progress)
    r = meta["recalibration"]
    print(f"bundle written to {args.out} (model {meta['model_version']}); fitted on {r['n_fit']} images "
          f"({r['n_fit_malignant']} melanoma), thresholds {meta['thresholds']}")
    test, before = meta["metrics"].get("test"), r.get("holdout_before")
    if test and before:
        def pair(m, k):
            return f"{m[k]['value']:.3f}"
        if r.get("source_gate_refused_fraction"):
            print(f"the source bundle's input gate refuses {r['source_gate_refused_fraction']:.0%} of these images"
                  + ("; the gate was re-fitted" if r["gate"] == "refit" else "; they were left out"))
        print(f"held out ({r['n_holdout']} images, {r['n_holdout_malignant']} melanoma): sensitivity / specificity "
              f"at the screening threshold {pair(before, 'sensitivity@screening')} / "
              f"{pair(before, 'specificity@screening')} before, {pair(test, 'sensitivity@screening')} / "
              f"{pair(test, 'specificity@screening')} after; ECE {pair(before, 'ece')} -> {pair(test, 'ece')}")
    print(DISCLAIMER)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="web app: Gradio page + REST API (/api/v1/predict), loopback by default")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; anything else exposes the app to the network)")
    p.add_argument("--port", type=_non_negative_int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--model", help="bundle folder (default: $MELANOMA_MODEL, else the shipped models/default)")
    p.add_argument("--share", action="store_true",
                   help="also publish a temporary public gradio.live link (off by default)")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest accepted upload in MB (default 20)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a Host name the app also answers when bound to loopback, such as the public name a reverse "
                        "proxy forwards; repeatable (also $MELANOMA_ALLOWED_HOSTS, comma-separated)")
    p.set_defaults(func=cmd_serve)


def _check_listen(host: str, port: int) -> None:
    """Refuse a host name that does not resolve and an address or port this process cannot listen on."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--host {host}: cannot resolve it ({getattr(exc, 'strerror', None) or exc}); accepted: an IP "
                        "address of this machine or a host name that resolves to one") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind(addr)
        except OSError as exc:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); accepted: a free "
                            "port (--port 0 picks one) on an address of this machine") from None


def cmd_serve(args) -> int:
    """Serve the app with uvicorn. MELANOMA_AUTH=user:password turns on the login (page and REST API)."""
    import threading
    import time

    if args.port > 65535:
        raise UserError(f"--port {args.port}: expected 0-65535")
    if args.max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb {args.max_upload_mb}: must be > 0")
    try:
        import uvicorn

        from melanoma_detector.app import build_app
        from melanoma_detector.app.security import LOOPBACK_HOSTS, auth_from_env, exposure_warnings, is_loopback
    except ImportError as exc:
        raise UserError(f"the web app needs the app extra: pip install -e '.[app]' ({exc})") from None

    credentials = auth_from_env()  # raises a UserError that never shows the value
    _check_listen(args.host, args.port)  # before the model loads, and one line rather than uvicorn's exit 3
    for line in exposure_warnings(args.host, share=args.share, login=credentials is not None):
        print(line, file=sys.stderr)
    # Bound to loopback, the app answers only for loopback names: a web page cannot reach it through a DNS
    # name of its own pointed at 127.0.0.1. --share's tunnel arrives at 127.0.0.1 with the tunnel's Host.
    extra = tuple(args.allowed_host or ()) + tuple(h for h in os.environ.get("MELANOMA_ALLOWED_HOSTS", "").split(",") if h)
    hosts = LOOPBACK_HOSTS + (args.host,) + extra if is_loopback(args.host) and not args.share else None
    app = build_app(args.model, max_upload_mb=args.max_upload_mb, auth=credentials or False, allowed_hosts=hosts)
    version = app.state.predictor.bundle.version
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=5, **SERVER_LIMITS))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving model {version} on http://{shown}:{args.port}/ (REST: /api/v1/predict, model card: /model-card)"
          + ("; login required" if credentials else ""))
    print(DISCLAIMER)
    if not args.share:
        server.run()
        return 0
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise UserError("the server did not start; see the log above")
            time.sleep(0.1)
        try:
            import secrets

            from gradio.networking import setup_tunnel

            url = setup_tunnel("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host, server.config.port,
                               secrets.token_urlsafe(32), None, None)
        except Exception as exc:  # no internet, blocked binary download, ...
            raise UserError(f"--share failed ({type(exc).__name__}: {exc}); the app is not shared") from None
        print(f"public link (temporary): {url}")
        while thread.is_alive():
            thread.join(timeout=0.5)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return 0


# Connections beyond this get 503 instead of exhausting file descriptors; idle keep-alive connections close
# after 5 s. A connection that never finishes its request still holds a slot: expose the app through a reverse
# proxy with request timeouts (docs in README), not directly.
SERVER_LIMITS = {"limit_concurrency": 128, "timeout_keep_alive": 5}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="melanoma",
        description="Benign vs. malignant (melanoma) classification of dermoscopic images. " + DISCLAIMER,
    )
    parser.add_argument("--version", action="version", version=f"melanoma-detector {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_data(sub)
    _add_export(sub)
    _add_card(sub)
    _add_recalibrate(sub)
    _add_refit_gate(sub)
    _add_unbundle(sub)
    _add_serve(sub)
    _disclaim(parser)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command `args` came from: `melanoma data check` for data's check."""
    for dest in ("command", "data_command"):
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, dest, None)
        if action is None or chosen not in action.choices:
            break
        parser = action.choices[chosen]
    return parser


def _disclaim(parser: argparse.ArgumentParser) -> None:
    """Every command's --help ends with the disclaimer (its description, or an epilog where it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                if DISCLAIMER not in (sub.description or "") + (sub.epilog or ""):
                    sub.epilog = DISCLAIMER if not sub.epilog else f"{sub.epilog} {DISCLAIMER}"
                _disclaim(sub)


# The extra (pyproject.toml) that installs each optional dependency: a command run without it says
# which to install instead of printing a traceback.
_EXTRA_OF = {"torch": "train", "torchvision": "train", "timm": "train", "safetensors": "train", "scipy": "train",
             "matplotlib": "train", "onnxruntime": "serve", "onnx": "export", "onnxscript": "export",
             "pyarrow": "batch", "gradio": "app", "fastapi": "app", "uvicorn": "app", "starlette": "app"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to ("melanoma predict: ..."), with its --help
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # The decoder refuses images over Pillow's pixel limit with a one-line reason of its own;
    # Pillow's DecompressionBombWarning for them would only add two confusing lines to stderr.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {_printable(str(exc))}", file=sys.stderr)  # a path in it may hold undecodable bytes
        return exc.exit_code
    except BrokenPipeError:
        # the reader stopped early (`--json - | head`): not an error, and nothing more can be printed to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # A path the file system refuses (a folder under a file, /proc, a read-only or full disk) is the
        # user's to fix, so one line; --verbose keeps the traceback for a report.
        logging.getLogger(__name__).debug("file-system error", exc_info=True)
        name = exc.filename
        where = f"{_printable(os.fsdecode(name) if isinstance(name, (str, bytes)) else str(name))}: " if name else ""
        print(f"error: {where}{exc.strerror or exc}; accepted: paths this user can read and a writable output "
              "folder with free space", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: `melanoma {args.command}` needs {exc.name}, which this installation lacks; accepted: "
              f"pip install 'melanoma-detector[{extra}]' (from a clone: pip install -e '.[{extra}]', or make install)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
