"""`make demo`: the shipped model on the sample images, then the web app on http://127.0.0.1:7860.
`make demo-train` (or `python scripts/demo.py --train`): a short, real train -> evaluate -> predict run.

Uses a small sample of the real dermoscopic images in ../shared/data when present (symlinked into
demo-run/data in the seed's train/test layout), otherwise a generated folder. The backbone is
tf_efficientnet_lite0 with offline ImageNet weights, so it runs anywhere in a few minutes.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "isic2017"
RUN = ROOT / "demo-run"


def build_subset(dst: Path, n_train: int = 160, n_test: int = 60) -> str:
    rng = random.Random(0)
    if SHARED.is_dir():
        for split, src_split, n in (("train", "train", n_train), ("test", "val", n_test)):
            for cls in ("benign", "malignant"):
                files = sorted((SHARED / src_split / cls).glob("*.jpg"))
                rng.shuffle(files)
                out = dst / split / cls
                out.mkdir(parents=True, exist_ok=True)
                for f in files[: n // 2]:
                    (out / f.name).symlink_to(f)
        return f"a sample of ISIC 2017 ({SHARED})"
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np

    from conftest import make_class_folder

    make_class_folder(dst / "train", n_train // 2, np.random.default_rng(0), "tr")
    make_class_folder(dst / "test", n_test // 2, np.random.default_rng(1), "te")
    return "generated images (../shared/data is absent)"


def melanoma(*args: str, ok_codes: tuple[int, ...] = (0,)) -> None:
    cmd = [sys.executable, "-m", "melanoma_detector", *args]
    print("$ melanoma " + " ".join(args), flush=True)
    rc = subprocess.run(cmd).returncode
    if rc not in ok_codes:
        raise SystemExit(f"demo: `melanoma {args[0]}` failed with exit code {rc}")


def score_examples() -> None:
    bundle = ROOT / "models" / "default" / "metadata.json"
    if bundle.is_file():
        print("== the shipped model on the sample images (torch-free predictor) ==", flush=True)
        melanoma("predict", str(ROOT / "examples"), "--no-progress")
    else:
        print("no shipped model bundle yet (models/default): skipping the sample predictions")


def train_demo() -> None:
    print("== a short real training run: train -> evaluate -> predict ==", flush=True)
    if RUN.exists():
        shutil.rmtree(RUN)
    data = RUN / "data"
    what = build_subset(data)
    print(f"demo data: {what}")
    # Exit code 1 = leakage found: ISIC 2017 has near-duplicates across train and val, which the
    # check is meant to report; the demo goes on.
    melanoma("data", "check", str(data), "--out", str(RUN / "data-check"), "--no-progress", ok_codes=(0, 1))
    melanoma(
        "train", "--data", str(data), "--out", str(RUN / "run"), "--backbone", "tf_efficientnet_lite0",
        "--image-size", "192", "--epochs-frozen", "15", "--epochs-finetune", "2", "--cache-views", "1",
        "--cache-dir", str(RUN / "cache"), "--batch-size", "32",
    )
    melanoma("evaluate", "--model", str(RUN / "run"), "--data", str(data), "--out", str(RUN / "evaluation"),
             "--resamples", "200")
    samples = sorted((data / "test" / "malignant").iterdir())[:2] + sorted((data / "test" / "benign").iterdir())[:2]
    melanoma("predict", "--model", str(RUN / "run"), *map(str, samples))
    print(f"\ndemo finished: run folder {RUN / 'run'}, evaluation report {RUN / 'evaluation' / 'report.html'}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="store_true", help="the short train -> evaluate -> predict run instead")
    args = ap.parse_args(argv)
    has_bundle = (ROOT / "models" / "default" / "metadata.json").is_file()
    if args.train or not has_bundle:
        train_demo()
        return 0
    score_examples()
    print("\n== the web app: open http://127.0.0.1:7860 (Ctrl-C stops it) ==", flush=True)
    try:
        melanoma("serve", "--host", "127.0.0.1", "--port", "7860")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
