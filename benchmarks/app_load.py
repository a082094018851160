"""Load test of the web app's REST endpoint, loopback only, bounded in count and time.

    python benchmarks/app_load.py [--bundle models/default] [-n 200] [-c 8] [--tta] [--max-seconds 300]
    python benchmarks/app_load.py --url http://127.0.0.1:7860 [-n 200] [-c 8]

Without --url it starts `melanoma serve` itself on a free 127.0.0.1 port (a separate process, so
client and server do not share a GIL), waits for /api/v1/health, sends N requests to
POST /api/v1/predict at concurrency C cycling through the sample images in examples/, stops the
server and prints p50/p95/p99 latency, errors and throughput (and JSON with --json). A --url must
be a loopback address. It never runs longer than --max-seconds (default 300) after warm-up.
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


def run_load(url: str, n: int, concurrency: int, *, tta: bool, warmup: int, max_seconds: float,
             auth: tuple[str, str] | None = None) -> dict:
    import httpx

    payloads = [(p.name, p.read_bytes()) for p in EXAMPLES]
    endpoint = f"{url.rstrip('/')}/api/v1/predict"
    params = {"tta": "true"} if tta else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = httpx.Client(timeout=60, limits=limits, auth=auth)
    model_version = None

    def one(i: int) -> tuple[float, int | str, str | None]:
        name, data = payloads[i % len(payloads)]
        t0 = time.perf_counter()
        try:
            r = client.post(endpoint, params=params, files={"file": (name, data, "image/jpeg")})
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                return elapsed, r.status_code, None
            body = r.json()
            return elapsed, 200, body.get("status"), body.get("model_version")
        except Exception as exc:  # noqa: BLE001 - every failure counts as an error
            return time.perf_counter() - t0, type(exc).__name__, None

    try:
        for i in range(warmup):  # sequential: first-run costs (graph optimisation, caches) are not measured
            one(i)
        stop_at = time.monotonic() + max_seconds
        stop = threading.Event()
        latencies, errors, statuses = [], {}, {}
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
                elapsed, code, status, *rest = res
                if code == 200:
                    latencies.append(elapsed)
                    statuses[status] = statuses.get(status, 0) + 1
                    model_version = model_version or (rest[0] if rest else None)
                else:
                    errors[str(code)] = errors.get(str(code), 0) + 1
        wall = time.perf_counter() - t_start
    finally:
        client.close()
    lat = sorted(latencies)
    return {
        "url": endpoint, "model_version": model_version, "requests": sent, "planned": n,
        "stopped_early": sent < n, "concurrency": concurrency, "tta": tta, "warmup": warmup,
        "ok_responses": len(lat), "errors": sum(errors.values()), "errors_by_kind": errors,
        "result_status": statuses, "wall_s": round(wall, 3), "throughput_rps": round(len(lat) / wall, 2) if wall else 0,
        "latency_s": {"p50": round(_percentile(lat, 0.50), 4), "p95": round(_percentile(lat, 0.95), 4),
                      "p99": round(_percentile(lat, 0.99), 4), "max": round(lat[-1], 4) if lat else None,
                      "mean": round(sum(lat) / len(lat), 4) if lat else None},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running app (loopback only); default: start one")
    ap.add_argument("--bundle", help="bundle for the server this starts (default: $MELANOMA_MODEL or models/default)")
    ap.add_argument("-n", "--requests", type=int, default=200)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--tta", action="store_true", help="request test-time augmentation (8 views per image)")
    ap.add_argument("--warmup", type=int, default=4, help="sequential requests first, not measured (default 4)")
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
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.url:
                url = args.url
            else:
                proc, url = start_server(args.bundle, Path(tmp) / "server.log")
            report = run_load(url, args.requests, args.concurrency, tta=args.tta, warmup=args.warmup,
                              max_seconds=args.max_seconds)
        finally:
            if proc is not None:
                stop_server(proc)
    report["cpu_count"] = os.cpu_count()
    report["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    lat = report["latency_s"]
    print(f"{report['requests']} requests at concurrency {report['concurrency']} -> {report['url']} "
          f"(model {report['model_version']}, tta={report['tta']})")
    print(f"errors: {report['errors']} {report['errors_by_kind'] or ''}  result status: {report['result_status']}")
    print(f"latency p50 {lat['p50'] * 1000:.0f} ms  p95 {lat['p95'] * 1000:.0f} ms  p99 {lat['p99'] * 1000:.0f} ms  "
          f"max {lat['max'] * 1000:.0f} ms" if lat["max"] is not None else "latency: no successful request")
    print(f"throughput {report['throughput_rps']} req/s over {report['wall_s']} s; "
          f"{report['cpu_count']} CPUs, load average after {report['loadavg_1m_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 and not report["stopped_early"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
