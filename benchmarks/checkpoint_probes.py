"""Cheap ways to get more out of trained runs, scored on a run's own val and test splits (ROC AUC
of the raw logit; HAM10000 and ISIC 2017 rows separately). No training: only forward passes.

    python benchmarks/checkpoint_probes.py --run runs/lite0-192-plain60 \
        [--average-last] [--ensemble-with runs/lite2-192-plain60 runs/lite1-192-plain60] \
        [--serve-at 192:1.0:crop 224:1.0:crop ...] [--tta]

--average-last    the kept weights (checkpoint.pt), the last epoch's (resume.pt) and their mean
--ensemble-with   the mean logit of this run's kept model and other runs' (same split): every
                  combination that includes this run, so a third member shows what it adds; each
                  combination's val AUC is compared with the first pair's (this run + the first
                  other run) by a paired DeLong test
--reference       compare this run alone and each combination against the mean logit of these runs
                  instead (for instance the shipped ensemble's members), on val and on test
--serve-at        val AUC of the kept model at other input sizes, centre crops and resize modes
                  (SIZE:CROP_PCT:crop|squash), against the one it was trained with
--tta             the kept weights and the last epoch's (resume.pt) scored plain and with the 8
                  flips/rotations averaged, as `--tta` serves; DeLong of TTA minus plain on val and
                  test. The kept epoch was picked by plain val AUC; the last one was not, so a TTA
                  gain that shows on val only for the last epoch points at that selection

The kept models' logits are cached in RUN/probe-logits/, keyed by the checkpoint file's size and
mtime, the split and the preprocessing, so probing a new member against old ones costs only its
own forward passes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from melanoma_detector.data.discovery import Sample
from melanoma_detector.evaluation.metrics import delong_test
from melanoma_detector.models.checkpoint import checkpoint_preprocessing, model_from_checkpoint, read_checkpoint
from melanoma_detector.training.engine import predict_logits
from melanoma_detector.training.sampling import build_image_loader

CPU = torch.device("cpu")


def split_samples(run: Path, split: str) -> list[Sample]:
    with (run / "split.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    return [Sample(path=r["path"], label=int(r["label"]), group=r["group"], split=split, key=r["key"]) for r in rows]


def logits(ckpt: dict, samples: list[Sample], pp=None) -> np.ndarray:
    model = model_from_checkpoint(ckpt).to(memory_format=torch.channels_last)
    loader = build_image_loader(samples, pp or checkpoint_preprocessing(ckpt), 64, workers=1, device=CPU, train=False)
    return predict_logits(model, loader, device=CPU)[0].ravel()


class Dihedral(torch.nn.Module):
    """The model's mean probability over the 8 flips/rotations, in the served `--tta`'s order, as
    a logit. The served one averages temperature-scaled probabilities; this uses the raw logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [v for k in range(4) for r in [torch.rot90(x, k, dims=(2, 3))] for v in (r, r.flip(3))]
        p = torch.stack([torch.sigmoid(self.model(v).float()) for v in views]).mean(0)
        return torch.logit(p.clamp(1e-7, 1 - 1e-7))


def tta_logits(ckpt: dict, samples: list[Sample]) -> np.ndarray:
    model = Dihedral(model_from_checkpoint(ckpt).to(memory_format=torch.channels_last))
    loader = build_image_loader(samples, checkpoint_preprocessing(ckpt), 32, workers=1, device=CPU, train=False)
    return predict_logits(model, loader, device=CPU)[0].ravel()


def kept_logits(run: Path, ckpt: dict, split: str, samples: list[Sample], pp=None) -> np.ndarray:
    pp = pp or checkpoint_preprocessing(ckpt)
    st = (run / "checkpoint.pt").stat()
    key = hashlib.sha256(repr((st.st_size, st.st_mtime_ns, split, len(samples), pp)).encode()).hexdigest()[:16]
    path = run / "probe-logits" / f"{split}-{key}.npy"
    if path.is_file():
        return np.load(path)
    z = logits(ckpt, samples, pp)
    path.parent.mkdir(exist_ok=True)
    np.save(path, z)
    return z


def aucs(samples: list[Sample], z: np.ndarray) -> str:
    y = np.array([s.label for s in samples])
    isic = np.array([s.key.startswith("isic") for s in samples])
    parts = [f"all {roc_auc_score(y, z):.4f}"]
    for name, mask in (("ham10000", ~isic), ("isic2017", isic)):
        if mask.any() and len(set(y[mask])) == 2:
            parts.append(f"{name} {roc_auc_score(y[mask], z[mask]):.4f}")
    return ", ".join(parts)


def compare(label: str, z: dict[str, np.ndarray], reference: tuple[str, dict[str, np.ndarray]],
            sets: dict[str, list[Sample]], splits=("val", "test")) -> None:
    """Paired DeLong test (clustered by lesion group) of `z` against the reference's logits on each of `splits`."""
    for s in splits:
        y = np.array([smp.label for smp in sets[s]])
        groups = np.array([smp.group_key for smp in sets[s]], dtype=object)  # a lesion's images are not independent
        d = delong_test(y, z[s], reference[1][s], groups=groups)
        print(f"{s:4s} DeLong, {label} minus {reference[0]}: {d['diff']:+.4f} "
              f"({d['ci_low']:+.4f}, {d['ci_high']:+.4f}), p = {d['p_value']:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--average-last", action="store_true")
    ap.add_argument("--ensemble-with", type=Path, nargs="+", default=[])
    ap.add_argument("--reference", type=Path, nargs="+", default=[])
    ap.add_argument("--serve-at", nargs="*", default=[])
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    kept = read_checkpoint(args.run / "checkpoint.pt")
    sets = {s: split_samples(args.run, s) for s in ("val", "test")}
    base = {s: kept_logits(args.run, kept, s, smp) for s, smp in sets.items()}
    for s, smp in sets.items():
        print(f"{s:4s} kept (epoch {kept['best']['epoch']}): {aucs(smp, base[s])}", flush=True)

    reference = None
    if args.reference:
        ref_z = {s: np.mean([kept_logits(r, read_checkpoint(r / "checkpoint.pt"), s, smp) for r in args.reference], axis=0)
                 for s, smp in sets.items()}
        reference = (" + ".join(r.name for r in args.reference), ref_z)
        for s, smp in sets.items():
            print(f"{s:4s} reference {reference[0]}: {aucs(smp, ref_z[s])}", flush=True)
        compare(args.run.name, base, reference, sets)

    if args.average_last:
        last = torch.load(args.run / "resume.pt", map_location="cpu", weights_only=True)["model_state"]
        mean = {k: (v.float() + last[k].float()).div(2).to(v.dtype) if v.is_floating_point() else v
                for k, v in kept["model_state"].items()}
        for name, state in (("last epoch", last), ("mean of kept and last", mean)):
            for s, smp in sets.items():
                print(f"{s:4s} {name}: {aucs(smp, logits({**kept, 'model_state': state}, smp))}", flush=True)

    if args.ensemble_with:
        runs = {run.name: run for run in args.ensemble_with}
        others = {name: read_checkpoint(run / "checkpoint.pt") for name, run in runs.items()}
        z = {name: {} for name in others}
        for name, ckpt in others.items():
            for s, smp in sets.items():
                z[name][s] = kept_logits(runs[name], ckpt, s, smp)
                print(f"{s:4s} {name} (epoch {ckpt['best']['epoch']}): {aucs(smp, z[name][s])}", flush=True)
        fixed_reference = reference is not None
        for k in range(1, len(others) + 1):
            for combo in itertools.combinations(others, k):
                label = " + ".join((args.run.name, *combo))
                mean = {s: (base[s] + sum(z[name][s] for name in combo)) / (k + 1) for s in sets}
                for s, smp in sets.items():
                    print(f"{s:4s} mean logit of {label}: {aucs(smp, mean[s])}", flush=True)
                if fixed_reference:
                    compare(label, mean, reference, sets)
                elif reference is None:
                    reference = (label, mean)
                else:
                    compare(label, mean, reference, sets, splits=("val",))

    if args.tta:
        weights = [(f"kept (epoch {kept['best']['epoch']})", kept, base)]
        if (args.run / "resume.pt").is_file():
            resume = torch.load(args.run / "resume.pt", map_location="cpu", weights_only=True)
            last = {**kept, "model_state": resume["model_state"]}
            weights.append(("last epoch", last, {s: logits(last, smp) for s, smp in sets.items()}))
        for name, ckpt, plain in weights:
            tta = {s: tta_logits(ckpt, smp) for s, smp in sets.items()}
            for s, smp in sets.items():
                print(f"{s:4s} {name}: plain {aucs(smp, plain[s])}; TTA {aucs(smp, tta[s])}", flush=True)
            compare(f"{name} TTA", tta, (f"{name} plain", plain), sets)

    pp = checkpoint_preprocessing(kept)
    for spec in args.serve_at:
        size, crop, mode = spec.split(":")
        alt = dataclasses.replace(pp, input_size=int(size), crop_pct=float(crop), resize_mode=mode)
        print(f"val  served at {spec}: {aucs(sets['val'], kept_logits(args.run, kept, 'val', sets['val'], alt))}", flush=True)


if __name__ == "__main__":
    main()
