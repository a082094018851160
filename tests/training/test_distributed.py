"""torchrun + DistributedDataParallel on CPU (gloo): two processes at batch b must train like one
process at batch 2b with the same seed, compute validation AUC over the whole validation set,
and leave the writing to rank 0."""

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_BACKBONE, kill_training_after, make_class_folder, run_rows
from melanoma_detector.cli import main


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-data")
    rng = np.random.default_rng(11)
    make_class_folder(root / "train", 16, rng, "tr")  # 32 images: whole global batches of 8
    make_class_folder(root / "val", 7, rng, "va")  # 14 images: 7 per rank
    make_class_folder(root / "test", 3, rng, "te")
    return root


def _args(data, out, cache, cfg, batch):
    return ["train", "--data", str(data), "--out", str(out), "--config", str(cfg), "--backbone", TINY_BACKBONE,
            "--no-pretrained", "--image-size", "64", "--epochs-frozen", "3", "--epochs-finetune", "1",
            "--phase2-mode", "cached", "--cache-views", "2", "--batch-size", str(batch), "--cache-dir", str(cache),
            "--no-progress", "--seed", "5", "--threads", "1", "--device", "cpu"]


def _torchrun(args: list[str]) -> str:
    """Two CPU processes under torchrun; their combined output.

    Once so far (a clean-clone CI run on 2026-11-28, after about thirty passing ones), rank 0 aborted
    inside the C++ runtime ("terminate called without an active exception", SIGABRT) right after the
    phase-2 cache was built; nine local repeats did not reproduce it. Only that signature gets one
    more attempt, reported as a warning with C++ stack traces on; any other failure, or the same
    abort twice, fails the test.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "melanoma_detector",
           *args]
    for attempt in (1, 2):
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=400)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or attempt == 2 or "terminate called without an active exception" not in out:
            break
        warnings.warn(f"torchrun rank aborted in the C++ runtime; retrying once:\n{out[-1500:]}", stacklevel=2)
        shutil.rmtree(args[args.index("--out") + 1], ignore_errors=True)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_gloo_processes_match_one_process_at_the_same_effective_batch(layout, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    # No dropout: its masks are per rank by design, everything else must agree.
    cfg.write_text(yaml.safe_dump({"model": {"dropout": [0.0, 0.0]}, "train": {"early_stopping_patience": 50}}))
    single = tmp_path / "single"
    assert main(_args(layout, single, tmp_path / "cache1", cfg, batch=8)) == 0

    ddp = tmp_path / "ddp"
    out = _torchrun(_args(layout, ddp, tmp_path / "cache2", cfg, batch=4))
    assert out.count("phase1 epoch 1/3") == 1, "only rank 0 logs epochs"
    assert out.count("best val AUC") == 1

    got, want = run_rows(ddp), run_rows(single)
    assert [(r["phase"], r["epoch"]) for r in got] == [(r["phase"], r["epoch"]) for r in want]
    for g, w in zip(got, want):
        if g["phase"] != "phase1":
            continue  # phase 2's backbone BatchNorm keeps per-rank statistics on CPU (no CPU SyncBatchNorm)
        for key in ("train_loss", "train_auc", "val_loss", "val_auc"):
            assert float(g[key]) == pytest.approx(float(w[key]), rel=1e-4, abs=1e-5), (key, g, w)
    assert got[-1]["phase"] == "phase2" and got[-1]["val_auc"] not in ("", None)
    a = torch.load(ddp / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(single / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["metrics"]["val"]["n"] == b["metrics"]["val"]["n"] == 14  # the whole validation set
    # the epoch was picked by the AUC of the very weights it kept (ranks once validated their own BatchNorm
    # statistics, so the gathered AUC belonged to no model)
    for ckpt in (a, b):
        assert ckpt["best"]["val_auc"] == pytest.approx(ckpt["metrics"]["val"]["roc_auc"], abs=1e-3)
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())


def test_a_killed_torchrun_job_resumes_under_torchrun(layout, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    # Image-based epochs (no feature cache), long enough to be killed inside one.
    cfg.write_text(yaml.safe_dump({"train": {"feature_cache": False, "early_stopping_patience": 50,
                                             "phase2_mode": "plain"}}))
    run = tmp_path / "ddp-run"
    args = _args(layout, run, tmp_path / "cache", cfg, batch=4)
    args[args.index("--epochs-frozen") + 1] = "4"
    args[args.index("--epochs-finetune") + 1] = "2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "melanoma_detector"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = kill_training_after([*torchrun, *args], run, epochs=2, env=env, log=tmp_path / "killed.log")
    assert 2 <= len(before) < 6

    done = subprocess.run([*torchrun, "train", "--resume", str(run), "--no-progress", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = run_rows(run)
    assert [(r["phase"], int(r["epoch"])) for r in rows] == [("phase1", e) for e in range(1, 5)] + [("phase2", 1), ("phase2", 2)]
    assert rows[: len(before) - 1] == before[: len(before) - 1]  # finished epochs are kept as they were
    assert torch.load(run / "resume.pt", map_location="cpu", weights_only=True)["stage"] == "done"
    assert (run / "checkpoint.pt").is_file()


def _two_ranks(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from melanoma_detector.training.distributed import DistInfo, GlobalBatchNorm1d, broadcast_buffers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2, local_rank=rank)
    try:
        # each rank's statistics drifted apart during the epoch; afterwards all hold rank 0's
        bn = torch.nn.BatchNorm2d(3)
        bn.running_mean.fill_(float(rank + 1))
        shadow = {"w": torch.full((2,), float(10 * (rank + 1)))}
        broadcast_buffers([*bn.buffers(), *shadow.values()], info)
        # the global batch norm of the head under bf16 autocast: statistics of both ranks' rows, in float32
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(16, 4, generator=gen) * 0.5 + 10.0  # mean/std 20: bf16's E[x^2] - mean^2 loses it all
        gbn = GlobalBatchNorm1d(4).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = gbn(x[rank * 8 : (rank + 1) * 8].to(torch.bfloat16))
        ref = torch.nn.BatchNorm1d(4).train()(x)[rank * 8 : (rank + 1) * 8]
        torch.save({"mean": bn.running_mean, "shadow": shadow["w"], "err": (y.float() - ref).abs().max().detach()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_buffers_follow_rank_0_and_the_global_batch_norm_survives_bf16(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["mean"], torch.ones(3)) and torch.equal(got["shadow"], torch.full((2,), 10.0))
        assert float(got["err"]) < 0.1  # bf16 rounding of the output only (NaN or ~1 before)


def _one_image_step(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from melanoma_detector.training.distributed import DistInfo
    from melanoma_detector.training.engine import train_one_epoch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2, local_rank=rank)
    try:
        torch.manual_seed(0)
        # a trainable backbone norm over a 1x1 map, as a 32 px input leaves at the last stage
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                  torch.nn.Linear(4, 1), torch.nn.Flatten(0))
        model = torch.nn.parallel.DistributedDataParallel(net)
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(3, 3, 1, 1, generator=gen)
        y = torch.tensor([0.0, 1.0, 1.0])
        # a rank's shard of 3 images at batch 2: the last per-rank batch holds one image on every rank
        loader = [(x[:2], y[:2], torch.arange(2)), (x[2:], y[2:], torch.arange(2, 3))]
        out = train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"),
                              dist=info)
        torch.save(out, f"{out_dir}/step{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_one_image_batch_per_rank_is_skipped_on_every_rank_not_a_crash(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_one_image_step, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"step{rank}.pt", weights_only=False)["n"] == 4  # 2 images on each rank
