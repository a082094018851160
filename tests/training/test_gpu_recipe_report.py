"""benchmarks/gpu_recipe/report.py, the last step of the GPU recipe, runs on a finished run: a GPU session
has 15 minutes in all, so a stale import there would cost the whole run's figures."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_report_reads_a_finished_run(tmp_path_factory, capsys):
    from conftest import train_tiny_bundle

    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu_recipe"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "benchmarks" / "gpu_recipe"))
    _, run, _ = train_tiny_bundle(tmp_path_factory, n_train=10, n_test=4, epochs_frozen=1, epochs_finetune=1,
                                  resamples=10)
    capsys.readouterr()
    assert report.main([str(run), "--wall", "12", "--workers", "0", "--batch-size", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["wall_seconds"] == 12 and out["phase1_epochs"] == out["phase2_epochs"] == 1
    assert out["eval_images_per_s"] > 0 and out["device"] == "cpu"
