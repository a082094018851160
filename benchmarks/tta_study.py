"""Why test-time augmentation helps the HAM10000 test split and not the validation split.

Through the shipped bundle, `--tta` (the mean of the 8 flips/90-degree rotations) adds +0.017 AUC on the
HAM10000 test split (DeLong p < 0.001) and nothing on validation (-0.001), where defaults are chosen
(docs/model-development.md). This script scores every HAM10000 val/test image and every ISIC 2017 val image of
the committed split in all 8 views once (cached), then asks:

1. what each view alone and each family of views (rotations, flips) gives on each set;
2. whether the val/test gap in the TTA gain is larger than chance: the HAM10000 val and test lesion groups are
   pooled and re-split at random many times, keeping the two sizes, and the gap of each re-split is compared
   with the observed one (a permutation test over lesion groups);
3. where the gain comes from: melanoma against each benign diagnosis, and the benign images by how their
   diagnosis was confirmed (HAM10000's dx_type).

Every image is scored, the input gate's refusals included (it refuses 1 of 1,502 test images), so the figures
differ from `melanoma evaluate` in the third decimal at most.

    python benchmarks/tta_study.py                    # about 8 min here the first time, seconds once cached
    python benchmarks/tta_study.py --permutations 5000
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from melanoma_detector.evaluation.metrics import delong_test, roc_auc

VIEW_NAMES = ["identity", "hflip", "rot90", "rot90+hflip", "rot180", "rot180+hflip", "rot270", "rot270+hflip"]
SETS = [("ham10000", "val"), ("ham10000", "test"), ("isic2017", "val")]


def read_rows(split_file: Path, data_root: Path) -> list[dict]:
    """The split's HAM10000 val/test and ISIC 2017 val rows, with HAM10000's diagnosis and its confirmation."""
    ham = {}
    with (data_root / "ham10000" / "labels.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            ham[r["image_id"]] = r
    rows = []
    with split_file.open(newline="") as fh:
        for r in csv.DictReader(fh):
            source = r["key"].split("/", 1)[0]
            if (source, r["split"]) not in SETS:
                continue
            info = ham.get(Path(r["key"]).stem, {}) if source == "ham10000" else {}
            rows.append({"path": str(data_root / r["key"]), "set": f"{source} {r['split']}", "group": r["group"],
                         "y": int(r["label"]), "dx": info.get("dx", "-"), "dx_type": info.get("dx_type", "-")})
    return rows


def view_logits(model: str | None, paths: list[str], *, threads: int, cache: Path):
    """(n, 8) raw logits of every view and the predictor; the logits cached by graph digest and image list."""
    import hashlib

    from melanoma_detector.data.io import load_image
    from melanoma_detector.inference import Predictor
    from melanoma_detector.inference.predictor import dihedral_views
    from melanoma_detector.preprocess import preprocess_image

    pred = Predictor(model, threads=threads)
    key = hashlib.sha256((pred.bundle.metadata["graph"]["sha256"] + "\n".join(paths)).encode()).hexdigest()[:16]
    path = cache / f"views-{key}.npz"
    if path.is_file():
        return np.load(path)["logits"], pred
    from tqdm import tqdm

    out, per_batch = [], 4
    for start in tqdm(range(0, len(paths), per_batch), desc="8 views", leave=False):
        arrays = [v for p in paths[start:start + per_batch]
                  for v in dihedral_views(preprocess_image(load_image(p), pred.pp))]
        out.append(pred.run(np.stack(arrays))["logit"].reshape(-1, 8))
    logits = np.concatenate(out).astype(np.float64)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, logits=logits)
    return logits, pred


def gain_gap_permutation(y, plain, tta, groups, in_val, *, n: int, seed: int) -> tuple[float, float, np.ndarray]:
    """Observed (TTA gain on val) - (TTA gain on test) and its two-sided permutation p over lesion groups."""
    def gap(mask):
        a = roc_auc(y[mask], tta[mask]) - roc_auc(y[mask], plain[mask])
        b = roc_auc(y[~mask], tta[~mask]) - roc_auc(y[~mask], plain[~mask])
        return a - b

    observed = gap(in_val)
    uniq, inv = np.unique(groups, return_inverse=True)
    n_val_groups = len(np.unique(groups[in_val]))
    rng = np.random.default_rng(seed)
    gaps = np.empty(n)
    for i in range(n):
        chosen = np.zeros(len(uniq), bool)
        chosen[rng.choice(len(uniq), n_val_groups, replace=False)] = True
        gaps[i] = gap(chosen[inv])
    p = (1 + np.sum(np.abs(gaps) >= abs(observed))) / (n + 1)
    return observed, p, gaps


def fmt_delong(y, a, b, groups=None) -> str:
    d = delong_test(y, a, b, groups=groups)  # clustered by lesion: one lesion's images are not independent
    p = "n/a" if d["p_value"] is None else "< 0.001" if d["p_value"] < 0.001 else f"{d['p_value']:.3f}"
    return f"{d['auc1']:.3f} vs {d['auc2']:.3f}: {d['diff']:+.3f} ({d['ci_low']:+.3f}, {d['ci_high']:+.3f}), p = {p}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bundle folder (default: the shipped model)")
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data"),
                    help="folder holding ham10000/ and isic2017/ (the split file's keys are relative to it)")
    ap.add_argument("--split-file", type=Path, default=Path("configs/splits/default.csv"))
    ap.add_argument("--cache", type=Path, default=Path("runs/tta_study"), help="where the 8-view logits are kept")
    ap.add_argument("--permutations", type=int, default=2000, help="random lesion-group re-splits for the p-value")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not (args.data_root / "ham10000" / "labels.csv").is_file() or not args.split_file.is_file():
        print(f"error: need {args.data_root}/ham10000/labels.csv and the split file {args.split_file}; accepted: "
              "--data-root pointing at the shared data folder", file=sys.stderr)
        return 2
    if args.permutations < 100:
        print("error: --permutations must be at least 100", file=sys.stderr)
        return 2

    rows = read_rows(args.split_file, args.data_root)
    logits, pred = view_logits(args.model, [r["path"] for r in rows], threads=args.threads, cache=args.cache)
    probs = pred.calibrate(logits.ravel()).reshape(logits.shape)
    y = np.array([r["y"] for r in rows])
    sets = np.array([r["set"] for r in rows])
    groups = np.array([r["group"] or r["path"] for r in rows], dtype=object)
    plain, tta = probs[:, 0], probs.mean(axis=1)  # as Predictor scores them: mean of calibrated probabilities
    families = {"rotations (identity, 90, 180, 270)": [0, 2, 4, 6], "identity + hflip": [0, 1],
                "flips of each rotation (4 mirrored views)": [1, 3, 5, 7]}

    print(f"bundle {pred.bundle.metadata.get('model_version')}; {len(rows)} images scored in all 8 views")
    for name in [f"{s} {sp}" for s, sp in SETS]:
        m = sets == name
        print(f"\n== {name}: n = {m.sum()} ({y[m].sum()} melanoma)")
        print(f"  TTA vs plain (DeLong): {fmt_delong(y[m], tta[m], plain[m], groups[m])}")
        single = [roc_auc(y[m], probs[m, k]) for k in range(8)]
        print("  each view alone: " + ", ".join(f"{n} {a:.3f}" for n, a in zip(VIEW_NAMES, single)))
        for fam, idx in families.items():
            print(f"  mean of {fam}: {roc_auc(y[m], probs[m][:, idx].mean(axis=1)):.3f}")
        spread = np.abs(probs[m] - plain[m, None]).max(axis=1)
        print(f"  largest change of one image's probability across views: median {np.median(spread):.3f}, "
              f"90th percentile {np.quantile(spread, 0.9):.3f}")

    ham = np.isin(sets, ["ham10000 val", "ham10000 test"])
    in_val = sets[ham] == "ham10000 val"
    groups = np.array([r["group"] for r in rows])[ham]
    obs, p, gaps = gain_gap_permutation(y[ham], plain[ham], tta[ham], groups, in_val, n=args.permutations, seed=0)
    print(f"\n== Is the val/test gap in the TTA gain chance? HAM10000 val + test pooled, {args.permutations} random "
          f"lesion-group re-splits of the same sizes")
    print(f"  observed (gain on val) - (gain on test): {obs:+.4f}; re-splits: 2.5-97.5 % "
          f"({np.quantile(gaps, 0.025):+.4f}, {np.quantile(gaps, 0.975):+.4f}); two-sided p = {p:.4f}")

    print("\n== Where the gain comes from (HAM10000): melanoma against each benign group, plain -> TTA")
    dx = np.array([r["dx"] for r in rows])
    dx_type = np.array([r["dx_type"] for r in rows])
    benign_groups = [(f"dx={d}", dx == d) for d in ("nv", "bkl", "bcc", "akiec", "vasc", "df")] + \
                    [(f"benign dx_type={t}", dx_type == t) for t in ("follow_up", "histo", "consensus", "confocal")]
    for split in ("val", "test"):
        m = sets == f"ham10000 {split}"
        mel = m & (y == 1)
        for label, in_group in benign_groups:
            benign = m & (y == 0) & in_group
            if benign.sum() < 10:
                continue
            sel = mel | benign
            a0, a1 = roc_auc(y[sel], plain[sel]), roc_auc(y[sel], tta[sel])
            print(f"  {split:4s} melanoma ({mel.sum()}) vs {label} ({benign.sum()}): {a0:.3f} -> {a1:.3f} "
                  f"({a1 - a0:+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
