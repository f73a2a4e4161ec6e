"""Load benchmark of `genseg serve`: latency percentiles and throughput at 1/4/16 requests in flight, and the
speed-up of micro-batching (--max-batch 16) over one-at-a-time (--max-batch 1) and of serve --precision int8 over
fp32 (--precision-only: just those two), measured in the same run; then
the hostile-load rows: normal segmentation traffic and /health latency on a pipeline server, alone and beside
decompression bombs, oversized requests and a generate flood, with the server's peak RSS.

    python scripts/bench_serve.py --checkpoint RUN_DIR [--requests 400] [--pipeline DIR]

Without --checkpoint it builds an untrained cpu-small segmenter (128 px, width 16): speed does not depend
on the weights. The hostile rows use the shipped demo pipeline unless --pipeline is given. Traffic goes to
127.0.0.1 only; every loop is bounded by --requests or by the normal traffic's end.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from genseg.inference.onnx import INT8_FILE
from genseg.inference.segmenter import model_folder
from genseg.serve.testing import ServerProcess, make_untrained_int8, make_untrained_segmenter, post_json, request
from genseg.workflows.pipeline_run import DEMO_PIPELINE


def run_load(port: int, body: bytes, requests: int, in_flight: int) -> dict:
    def one(_):
        started = time.perf_counter()
        status, _ = post_json(port, "/predict", body)
        return status, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = sorted(t for _, t in results)
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"in_flight": in_flight, "ok": sum(s == 200 for s, _ in results),
            "5xx": sum(s >= 500 for s, _ in results), "p50_ms": q[49] * 1e3, "p95_ms": q[94] * 1e3,
            "p99_ms": q[98] * 1e3, "req_per_s": requests / wall}


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def hostile_bodies() -> list[bytes]:
    """Requests a hostile client sends: 64 blank 4096² PNGs (~16.8 Mpx each, refused by claim), a 10000² PNG
    bomb, an HDF5 .mat claiming a huge fill-value dataset, three large valid images, and a malformed body."""
    blank = png_b64(np.zeros((4096, 4096), np.uint8))
    bomb = png_b64(np.zeros((10000, 10000), bool))
    h5 = io.BytesIO()
    with h5py.File(h5, "w") as f:
        f.create_dataset("cjdata/image", shape=(60000, 60000), dtype="f8", fillvalue=1.0)
    fill = base64.b64encode(h5.getvalue()).decode()
    return [json.dumps({"instances": instances}).encode() for instances in (
        [{"b64": blank}] * 64, [{"b64": bomb}], [{"b64": fill}], [{"b64": blank}] * 3)] + [b'{"instances": [[' * 900]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hostile_load(pipeline: Path, body: bytes, requests: int) -> list[dict]:
    """Normal traffic (2 in flight) and a /health probe every 0.1 s, alone and then beside hostile clients
    (bombs in a loop from 2 threads, a generate flood from 4) on one pipeline server."""
    generate = json.dumps({"instances": [{}], "parameters": {"generate": 8, "steps": 20}}).encode()
    rows = []
    with ServerProcess(pipeline, max_batch=16) as server:
        run_load(server.port, body, 10, 2)  # warm-up
        for hostile in (False, True):
            done = threading.Event()
            statuses: list[int] = []
            health: list[float] = []

            def probe():
                while not done.is_set():
                    started = time.perf_counter()
                    request(server.port, "GET", "/health", timeout=30)
                    health.append(time.perf_counter() - started)
                    time.sleep(0.1)

            def attack(bodies):
                while not done.is_set():
                    for b in bodies:
                        statuses.append(post_json(server.port, "/predict", b, timeout=120)[0])

            threads = [threading.Thread(target=probe)]
            if hostile:
                threads += [threading.Thread(target=attack, args=(hostile_bodies(),)) for _ in range(2)]
                threads += [threading.Thread(target=attack, args=([generate],)) for _ in range(4)]
            for t in threads:
                t.start()
            row = run_load(server.port, body, requests, 2)
            done.set()
            for t in threads:
                t.join()
            q = statistics.quantiles(health, n=100, method="inclusive")
            rows.append({**row, "traffic": "hostile" if hostile else "normal only", "health_p95_ms": q[94] * 1e3,
                         "health_max_ms": max(health) * 1e3, "rss_peak_mib": peak_rss_mib(server.process.pid),
                         "hostile_requests": len(statuses), "hostile_5xx": sum(s >= 500 and s != 503 for s in statuses),
                         "hostile_503": statuses.count(503)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--pipeline", type=Path, help="pipeline folder for the hostile rows (default: the shipped one)")
    parser.add_argument("--precision-only", action="store_true",
                        help="only the --max-batch 16 rows of serve --precision fp32 and int8")
    args = parser.parse_args()
    servers = [(16, "fp32"), (16, "int8")] if args.precision_only else [(1, "fp32"), (16, "fp32"), (16, "int8")]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_untrained_segmenter(Path(tmp) / "seg", size=128, base_channels=16)
        if not args.checkpoint:
            make_untrained_int8(checkpoint)
        elif not (model_folder(checkpoint)[0] / INT8_FILE).is_file():
            print(f"{checkpoint} has no int8 export (genseg export-onnx --int8): no int8 rows")
            servers = [s for s in servers if s[1] == "fp32"]
        image = (np.random.default_rng(0).random((128, 128)) * 255).astype(np.uint8)
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        body = json.dumps({"instances": [{"b64": base64.b64encode(png.getvalue()).decode()}],
                           "parameters": {"mask_format": "rle"}}).encode()
        rows = []
        for max_batch, precision in servers:
            with ServerProcess(checkpoint, max_batch=max_batch, extra_args=["--precision", precision]) as server:
                run_load(server.port, body, 20, 4)  # warm-up
                for in_flight in (1, 4, 16):
                    rows.append({"max_batch": max_batch, "precision": precision,
                                 **run_load(server.port, body, args.requests, in_flight)})
    print(f"{'max_batch':>9} {'precision':>9} {'in_flight':>9} {'ok':>5} {'5xx':>4} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'req/s':>7}")
    for r in rows:
        print(f"{r['max_batch']:>9} {r['precision']:>9} {r['in_flight']:>9} {r['ok']:>5} {r['5xx']:>4} "
              f"{r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['req_per_s']:>7.1f}")
    by = {(r["max_batch"], r["precision"], r["in_flight"]): r["req_per_s"] for r in rows}
    for in_flight in (1, 4, 16):
        if (1, "fp32", in_flight) in by and in_flight > 1:
            print(f"batching speed-up at {in_flight} in flight: "
                  f"{by[(16, 'fp32', in_flight)] / by[(1, 'fp32', in_flight)]:.2f}x")
        if (16, "int8", in_flight) in by:
            print(f"int8 / fp32 throughput at --max-batch 16, {in_flight} in flight: "
                  f"{by[(16, 'int8', in_flight)] / by[(16, 'fp32', in_flight)]:.2f}x")
    if args.precision_only:
        return

    pipeline = args.pipeline or DEMO_PIPELINE
    side = 64
    image = (np.random.default_rng(1).random((side, side)) * 255).astype(np.uint8)
    small = json.dumps({"instances": [{"b64": png_b64(image)}], "parameters": {"mask_format": "rle"}}).encode()
    hostile = hostile_load(pipeline, small, max(50, args.requests // 4))
    print(f"\nhostile load ({pipeline.name}, 64 px PNG, 2 normal requests in flight)")
    print(f"{'traffic':>12} {'ok':>5} {'5xx':>4} {'p50 ms':>8} {'p95 ms':>8} {'health p95':>10} {'health max':>10} "
          f"{'RSS peak MiB':>12} {'hostile req':>11} {'503':>5} {'hostile 5xx':>11}")
    for r in hostile:
        print(f"{r['traffic']:>12} {r['ok']:>5} {r['5xx']:>4} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
              f"{r['health_p95_ms']:>10.1f} {r['health_max_ms']:>10.1f} {r['rss_peak_mib']:>12.0f} "
              f"{r['hostile_requests']:>11} {r['hostile_503']:>5} {r['hostile_5xx']:>11}")


if __name__ == "__main__":
    main()
