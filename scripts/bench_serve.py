"""Load benchmark of `genseg serve`: latency percentiles and throughput at 1/4/16 requests in flight, and the
speed-up of micro-batching (--max-batch 16) over one-at-a-time (--max-batch 1), measured in the same run.

    python scripts/bench_serve.py --checkpoint RUN_DIR [--requests 400]

Without --checkpoint it builds an untrained cpu-small segmenter (128 px, width 16): speed does not depend
on the weights. Traffic goes to 127.0.0.1 only; every loop is bounded by --requests.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from genseg.serve.testing import ServerProcess, make_untrained_segmenter, post_json


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_untrained_segmenter(Path(tmp) / "seg", size=128, base_channels=16)
        image = (np.random.default_rng(0).random((128, 128)) * 255).astype(np.uint8)
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        body = json.dumps({"instances": [{"b64": base64.b64encode(png.getvalue()).decode()}],
                           "parameters": {"mask_format": "rle"}}).encode()
        rows = []
        for max_batch in (1, 16):
            with ServerProcess(checkpoint, max_batch=max_batch) as server:
                run_load(server.port, body, 20, 4)  # warm-up
                for in_flight in (1, 4, 16):
                    rows.append({"max_batch": max_batch, **run_load(server.port, body, args.requests, in_flight)})
    print(f"{'max_batch':>9} {'in_flight':>9} {'ok':>5} {'5xx':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>7}")
    for r in rows:
        print(f"{r['max_batch']:>9} {r['in_flight']:>9} {r['ok']:>5} {r['5xx']:>4} {r['p50_ms']:>8.1f} "
              f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['req_per_s']:>7.1f}")
    by = {(r["max_batch"], r["in_flight"]): r["req_per_s"] for r in rows}
    for in_flight in (4, 16):
        print(f"batching speed-up at {in_flight} in flight: {by[(16, in_flight)] / by[(1, in_flight)]:.2f}x")


if __name__ == "__main__":
    main()
