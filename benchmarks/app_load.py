"""Load test of the web app's REST endpoint with valid and invalid uploads, loopback only, bounded
in count and time.

    python benchmarks/app_load.py [--bundle models/default] [-n 1000] [-c 16] [--valid-only] [--tta]
    python benchmarks/app_load.py --url http://127.0.0.1:7860 [-n 200] [-c 8]

Without --url it starts `melanoma serve` itself on a free 127.0.0.1 port (a separate process, so
client and server do not share a GIL), waits for /api/v1/health, sends N requests to
POST /api/v1/predict at concurrency C and stops the server. Unless --valid-only, the requests mix
the sample images in examples/ (also sent with a wrong part content type) with invalid uploads:
corrupt and truncated images, text named .jpg, empty files, files over the 20 MB upload limit and
bodies that are not multipart. It prints answers by kind, 5xx count, whether the server process
survived and still answers /health, whether every valid image got status ok, latency p50/p95/p99
and the server's memory: VmRSS sampled every 50 ms from /proc/PID/status, growth over the baseline
taken after a warm-up of every kind, and VmHWM. A --url must be a loopback address (no memory
figures then). It never runs longer than --max-seconds (default 300) after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
MAX_REQUESTS = 5000
UPLOAD_LIMIT_MB = 20  # `melanoma serve`'s default --max-upload-mb
# One cycle of request kinds; N requests repeat it. Valid images are half the traffic.
MIX = ["valid"] * 10 + ["valid_wrong_type"] * 2 + ["corrupt", "truncated", "text", "text", "empty",
                                                    "oversize", "not_multipart", "not_multipart"]
EXPECTED_STATUS = {"valid": 200, "valid_wrong_type": 200, "corrupt": 422, "truncated": 422, "text": 422,
                   "empty": 400, "oversize": 413, "not_multipart": 400}


def _is_loopback_url(url: str) -> bool:
    from melanoma_detector.app.security import is_loopback

    host = urlparse(url).hostname or ""
    return is_loopback(host)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def start_server(bundle: str | None, log_path: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "melanoma_detector", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if bundle:
        cmd += ["--model", bundle]
    env = {k: v for k, v in os.environ.items() if k != "MELANOMA_AUTH"}
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise SystemExit(f"server did not answer within {timeout:.0f} s")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _payloads() -> dict[str, list[dict]]:
    """Request kwargs for httpx, per kind (several variants each, cycled)."""
    import random

    rng = random.Random(0)
    images = [(p.name, p.read_bytes()) for p in EXAMPLES]
    oversize = b"\xff\xd8\xff\xe0" + bytes(UPLOAD_LIMIT_MB * 1024 * 1024 + 4096)
    return {
        "valid": [{"files": {"file": (n, d, "image/jpeg")}} for n, d in images],
        "valid_wrong_type": [{"files": {"file": (n, d, "text/plain")}} for n, d in images],
        "corrupt": [{"files": {"file": (f"noise{i}.jpg", rng.randbytes(20_000), "image/jpeg")}} for i in range(4)],
        "truncated": [{"files": {"file": (f"cut-{n}", d[: len(d) // 2], "image/jpeg")}} for n, d in images],
        "text": [{"files": {"file": ("notes.jpg", b"not an image\n" * 200, "image/jpeg")}},
                 {"files": {"file": ("page.png", b"<!doctype html><html><body>hi</body></html>", "image/png")}}],
        "empty": [{"files": {"file": ("empty.jpg", b"", "image/jpeg")}}],
        "oversize": [{"files": {"file": ("huge.jpg", oversize, "image/jpeg")}}],
        "not_multipart": [{"content": images[0][1], "headers": {"content-type": "image/jpeg"}},
                          {"content": b'{"file": "x"}', "headers": {"content-type": "application/json"}}],
    }


def read_memory(pid: int) -> dict[str, int] | None:
    """VmRSS and VmHWM of a process in kB (Linux /proc), or None when it is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out or None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc); less sensitive than wall time to
    other work on a shared machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemorySampler(threading.Thread):
    """Samples a process's VmRSS every `interval` seconds until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            mem = read_memory(self.pid)
            if mem:
                self.peak_kb = max(self.peak_kb, mem["VmRSS"])
                self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join(timeout=5)


def run_load(url: str, n: int, concurrency: int, *, tta: bool, warmup: int, max_seconds: float,
             auth: tuple[str, str] | None = None, valid_only: bool = False, server_pid: int | None = None) -> dict:
    import httpx

    payloads = _payloads()
    mix = ["valid"] if valid_only else MIX
    endpoint = f"{url.rstrip('/')}/api/v1/predict"
    params = {"tta": "true"} if tta else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = httpx.Client(timeout=60, limits=limits, auth=auth)
    model_version = None

    def one(i: int, kind: str | None = None) -> tuple[str, float, int | str, str | None, str | None]:
        kind = kind or mix[i % len(mix)]
        variants = payloads[kind]
        kwargs = variants[(i // len(mix)) % len(variants)]
        t0 = time.perf_counter()
        try:
            r = client.post(endpoint, params=params, **kwargs)
            elapsed = time.perf_counter() - t0
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            return kind, elapsed, r.status_code, body.get("status"), body.get("model_version")
        except Exception as exc:  # noqa: BLE001 - every failure is counted, by type
            return kind, time.perf_counter() - t0, type(exc).__name__, None, None

    def health() -> bool:
        try:
            return httpx.get(f"{url.rstrip('/')}/api/v1/health", auth=auth, timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    try:
        # Warm-up at full concurrency, every kind at least once, so first-use allocations (graph
        # optimisation, ONNX Runtime's arena for concurrent runs, worker threads, error paths) are in
        # the memory baseline and only growth during the run (a leak, fragmentation) counts.
        before_warmup = read_memory(server_pid) if server_pid else None
        for kind in sorted(set(mix)):
            one(0, kind)
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(warmup)))
        baseline = read_memory(server_pid) if server_pid else None
        cpu_start = cpu_seconds(server_pid) if server_pid else None
        sampler = MemorySampler(server_pid) if server_pid else None
        if sampler:
            sampler.start()
        stop_at = time.monotonic() + max_seconds
        stop = threading.Event()
        by_kind: dict[str, dict] = {}
        latencies: list[float] = []
        valid_latencies: list[float] = []
        sent = 0

        def guarded(i: int):
            if stop.is_set() or time.monotonic() > stop_at:
                stop.set()
                return None
            return one(i)

        t_start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(guarded, i) for i in range(n)]
            for fut in as_completed(futures):
                res = fut.result()
                if res is None:
                    continue
                sent += 1
                kind, elapsed, code, status, version = res
                k = by_kind.setdefault(kind, {"sent": 0, "answers": {}, "expected": EXPECTED_STATUS[kind],
                                              "unexpected": 0, "result_status": {}})
                k["sent"] += 1
                k["answers"][str(code)] = k["answers"].get(str(code), 0) + 1
                if code != EXPECTED_STATUS[kind]:
                    k["unexpected"] += 1
                if isinstance(code, int):
                    latencies.append(elapsed)
                if code == 200:
                    k["result_status"][status] = k["result_status"].get(status, 0) + 1
                    model_version = model_version or version
                if kind.startswith("valid"):
                    valid_latencies.append(elapsed)
        wall = time.perf_counter() - t_start
        if sampler:
            sampler.stop()
        end_mem = read_memory(server_pid) if server_pid else None
        cpu_end = cpu_seconds(server_pid) if server_pid else None
        alive = health()
    finally:
        client.close()

    def pct(values: list[float]) -> dict:
        v = sorted(values)
        return {"p50": round(_percentile(v, 0.50), 4), "p95": round(_percentile(v, 0.95), 4),
                "p99": round(_percentile(v, 0.99), 4), "max": round(v[-1], 4) if v else None}

    codes = [c for k in by_kind.values() for c in k["answers"]]

    def count(pred) -> int:
        return sum(n for k in by_kind.values() for c, n in k["answers"].items() if pred(c))

    valid_sent = sum(k["sent"] for name, k in by_kind.items() if name.startswith("valid"))
    valid_ok = sum(k["result_status"].get("ok", 0) for name, k in by_kind.items() if name.startswith("valid"))
    memory = None
    if baseline and sampler and end_mem:
        peak = max(sampler.peak_kb, end_mem["VmRSS"])
        memory = {"rss_before_warmup_mb": round(before_warmup["VmRSS"] / 1024, 1),
                  "baseline_rss_mb": round(baseline["VmRSS"] / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
                  "end_rss_mb": round(end_mem["VmRSS"] / 1024, 1),
                  "peak_growth_mb": round((peak - baseline["VmRSS"]) / 1024, 1),
                  "vmhwm_mb": round(end_mem["VmHWM"] / 1024, 1), "samples": sampler.samples}
    return {
        "url": endpoint, "model_version": model_version, "requests": sent, "planned": n,
        "stopped_early": sent < n, "concurrency": concurrency, "tta": tta, "warmup": warmup,
        "mix": "valid only" if valid_only else MIX,
        "by_kind": by_kind, "server_errors_5xx": count(lambda c: c.isdigit() and int(c) >= 500),
        "transport_errors": count(lambda c: not c.isdigit()),
        "unexpected": sum(k["unexpected"] for k in by_kind.values()),
        "valid_sent": valid_sent, "valid_ok": valid_ok, "all_valid_ok": valid_sent == valid_ok,
        "server_answers_health_after": alive, "wall_s": round(wall, 3),
        "throughput_rps": round(sent / wall, 2) if wall else 0,
        "latency_s": pct(latencies), "latency_valid_s": pct(valid_latencies), "memory": memory,
        "server_cpu_ms_per_request": round(1000 * (cpu_end - cpu_start) / sent, 1)
        if cpu_start is not None and cpu_end is not None and sent else None,
        "codes_seen": sorted(set(codes)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running app (loopback only); default: start one")
    ap.add_argument("--bundle", help="bundle for the server this starts (default: $MELANOMA_MODEL or models/default)")
    ap.add_argument("-n", "--requests", type=int, default=1000)
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--valid-only", action="store_true", help="only the sample images (no invalid uploads)")
    ap.add_argument("--tta", action="store_true", help="request test-time augmentation (8 views per image)")
    ap.add_argument("--warmup", type=int, help="requests sent first at the same concurrency, not measured "
                                                "(default: 4 x concurrency, at least one of each kind)")
    ap.add_argument("--max-seconds", type=float, default=300, help="stop sending after this long (default 300)")
    ap.add_argument("--json", help="also write the report as JSON to this file")
    args = ap.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        ap.error(f"--requests must be 1..{MAX_REQUESTS}")
    if not 1 <= args.concurrency <= 64:
        ap.error("--concurrency must be 1..64")
    if not 0 < args.max_seconds <= 1800:
        ap.error("--max-seconds must be in (0, 1800]")
    if not EXAMPLES:
        ap.error(f"no sample images in {ROOT / 'examples'}")
    if args.url and not _is_loopback_url(args.url):
        ap.error(f"--url {args.url}: only loopback addresses (127.0.0.0/8, ::1, localhost) may be load-tested")

    proc = None
    crashed = False
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        try:
            if args.url:
                url = args.url
            else:
                proc, url = start_server(args.bundle, log_path)
            warmup = args.warmup if args.warmup is not None else 4 * args.concurrency
            report = run_load(url, args.requests, args.concurrency, tta=args.tta, warmup=warmup,
                              max_seconds=args.max_seconds, valid_only=args.valid_only,
                              server_pid=proc.pid if proc else None)
            if proc is not None:
                crashed = proc.poll() is not None
        finally:
            if proc is not None:
                stop_server(proc)
                log_text = log_path.read_text(errors="replace")
        if proc is not None:
            report["server_log_tracebacks"] = log_text.count("Traceback")
    report["server_crashed"] = crashed
    report["cpu_count"] = os.cpu_count()
    report["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    print(f"{report['requests']} requests at concurrency {report['concurrency']} -> {report['url']} "
          f"(model {report['model_version']}, tta={report['tta']})")
    for kind, k in sorted(report["by_kind"].items()):
        print(f"  {kind:<17} sent {k['sent']:>4}  expected {k['expected']}  answers {k['answers']}"
              + (f"  result status {k['result_status']}" if k["result_status"] else ""))
    print(f"5xx answers: {report['server_errors_5xx']}  transport errors: {report['transport_errors']}  "
          f"unexpected answers: {report['unexpected']}")
    tracebacks = report.get("server_log_tracebacks")
    print(f"server crashed: {'YES' if crashed else 'no'}; answers /health after the run: "
          f"{'yes' if report['server_answers_health_after'] else 'NO'}"
          + (f"; tracebacks in server log: {tracebacks}" if tracebacks is not None else ""))
    print(f"valid images answered status ok: {report['valid_ok']}/{report['valid_sent']}")
    for label, key in (("all", "latency_s"), ("valid", "latency_valid_s")):
        lat = report[key]
        if lat["max"] is not None:
            print(f"latency ({label}) p50 {lat['p50'] * 1000:.0f} ms  p95 {lat['p95'] * 1000:.0f} ms  "
                  f"p99 {lat['p99'] * 1000:.0f} ms  max {lat['max'] * 1000:.0f} ms")
    mem = report["memory"]
    if mem:
        print(f"server RSS: {mem['rss_before_warmup_mb']} MB before warm-up, baseline {mem['baseline_rss_mb']} MB "
              f"after warm-up, peak {mem['peak_rss_mb']} MB "
              f"(growth {mem['peak_growth_mb']:+} MB), end {mem['end_rss_mb']} MB, VmHWM {mem['vmhwm_mb']} MB "
              f"({mem['samples']} samples)")
    if report["server_cpu_ms_per_request"] is not None:
        print(f"server CPU time: {report['server_cpu_ms_per_request']} ms per request (user + system)")
    print(f"throughput {report['throughput_rps']} req/s over {report['wall_s']} s; "
          f"{report['cpu_count']} CPUs, load average after {report['loadavg_1m_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = (report["server_errors_5xx"] == 0 and report["transport_errors"] == 0 and report["unexpected"] == 0
          and report["all_valid_ok"] and not crashed and report["server_answers_health_after"]
          and not report["stopped_early"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
