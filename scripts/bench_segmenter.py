"""Benchmark of the paper's segmentation U-Net on this machine's CPU (issue 4, Performance), in one run.

Prints: the measured fp32 matmul peak; inference ms/slice and achieved GFLOPS at 256x256 for eager NCHW,
channels_last and bf16 autocast; training ms/slice and peak RSS at batch 8 (each in a fresh subprocess, so the
RSS is training's own); the saved model's size. With --quality DATA.h5 it trains configs/seg-cpu-small.yaml on
that file (CLI, as a user would) and reports test Dice and wall time, then the Dice of that model's fp32 vs bf16
masks on the test split (or of --model RUN_DIR on --data DATA.h5).

    genseg demo-data demo/raw && genseg prepare demo/raw --out demo/demo.h5 --size 128
    PYTHONPATH=$PWD python3 scripts/bench_segmenter.py --quality demo/demo.h5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from genseg.models.unet import SegmentationUNet

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b, repeats) / 1e9


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def inference_variants(model: SegmentationUNet, batch: int, repeats: int):
    """Yields (name, seconds per slice) for eager NCHW, channels_last, channels_last with BatchNorm folded into
    the convs (what `Segmenter` runs), channels_last + bf16 autocast, and torch.compile (inductor) of the folded
    model (its one-off compile happens in the untimed warm-up call)."""
    x = torch.rand(batch, 1, 256, 256)
    folded = model.fold_batchnorm()
    for name, model, memory_format, dtype in (
            ("eager NCHW fp32", model, torch.contiguous_format, None),
            ("channels_last fp32", model, torch.channels_last, None),
            ("channels_last + folded BN fp32 (Segmenter)", folded, torch.channels_last, None),
            ("channels_last bf16", model, torch.channels_last, torch.bfloat16),
            ("torch.compile, folded BN, channels_last (Segmenter(compile=True))", torch.compile(folded),
             torch.channels_last, None)):
        model = model.to(memory_format=memory_format)
        xx = x.contiguous(memory_format=memory_format)
        amp = torch.autocast("cpu", dtype=dtype) if dtype else nullcontext()

        def run():
            with torch.no_grad(), amp:
                model(xx)

        yield name, timed(run, repeats) / batch


TRAIN_CHILD = """
import resource, sys, time, torch
from genseg.models.unet import SegmentationUNet
from genseg.training.seg import seg_loss
torch.manual_seed(0)
batch, steps, checkpointing = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
model = SegmentationUNet()
if checkpointing:
    model.enable_gradient_checkpointing()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = torch.rand(batch, 1, 256, 256), (torch.rand(batch, 1, 256, 256) > 0.9).float()
times = []
for _ in range(steps + 1):
    start = time.perf_counter()
    seg_loss(model(x), y, "bce").mean().backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
print(sorted(times[1:])[len(times[1:]) // 2] / batch, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)
"""


def training(batch: int, steps: int, threads: int, checkpointing: bool = False) -> tuple[float, float]:
    """(seconds per slice, peak RSS in GiB) of Adam training steps at `batch`, in a fresh process, optionally
    with gradient checkpointing (`--gradient-checkpointing`)."""
    out = subprocess.run([sys.executable, "-c", f"import torch; torch.set_num_threads({threads})\n" + TRAIN_CHILD,
                          str(batch), str(steps), str(int(checkpointing))], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    sec, rss = out.stdout.split()
    return float(sec), float(rss)


def bf16_agreement(run_dir: str, data: str, limit: int = 64) -> dict:
    """Dice of a trained model's masks against ground truth in fp32 and bf16, and between the two."""
    from genseg.data.prepared import PreparedDataset
    from genseg.inference import load_segmenter
    from genseg.metrics import dice_iou

    segmenter = load_segmenter(run_dir, device="cpu")
    dataset = PreparedDataset(data, split="test")
    items = [dataset[i] for i in range(min(limit, len(dataset)))]
    images = torch.stack([it["image"] for it in items]).numpy()
    truth = torch.stack([it["mask"] for it in items])[:, 0].numpy() > 0.5
    fp32 = segmenter.predict(images) >= segmenter.threshold
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = segmenter.predict(images) >= segmenter.threshold
    return {"slices": len(items), "dice_fp32": float(dice_iou(fp32, truth)[0].mean()),
            "dice_bf16": float(dice_iou(bf16, truth)[0].mean()), "dice_fp32_vs_bf16": float(dice_iou(fp32, bf16)[0].mean())}


def quality(data: str) -> dict:
    """Train configs/seg-cpu-small.yaml on `data` end to end (CLI, as a user would) and report the test scores."""
    out_dir = Path(tempfile.mkdtemp(prefix="bench-seg-")) / "run"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "genseg", "train-seg", "--data", data, "--config",
                    str(ROOT / "configs" / "seg-cpu-small.yaml"), "--out", str(out_dir)], check=True,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    wall = time.perf_counter() - start
    test = json.loads((out_dir / "metrics.json").read_text())["test"]
    return {"run": str(out_dir), "wall_s": wall, "dice": test["dice"], "dice_tumour": test["dice_tumour"],
            "iou": test["iou"], "fp_rate": test["fp_rate"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=4, help="inference batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--model", help="trained run for the fp32 vs bf16 Dice (needs --data)")
    parser.add_argument("--data", help="prepared file for --model")
    parser.add_argument("--quality", help="prepared file: train seg-cpu-small.yaml on it, report Dice and time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = SegmentationUNet().eval()
    params = sum(p.numel() for p in model.parameters())
    gflop = forward_flops(model, torch.rand(1, 1, 256, 256)) / 1e9
    peak = matmul_peak_gflops()
    print(f"CPU threads {args.threads}; paper U-Net {params / 1e6:.1f} M parameters, {gflop:.1f} GFLOP per 256x256 "
          f"forward (FlopCounterMode); fp32 matmul peak {peak:.0f} GFLOPS (2048^3 mm)", flush=True)
    print(f"\n| inference 256x256, batch {args.batch} | ms/slice | GFLOPS | % of matmul peak | speed-up vs eager |")
    print("|---|---|---|---|---|", flush=True)
    base = None
    for name, sec in inference_variants(model, args.batch, args.repeats):
        base = base or sec
        print(f"| {name} | {sec * 1e3:.0f} | {gflop / sec:.1f} | {100 * gflop / sec / peak:.0f} % | {base / sec:.2f}x |",
              flush=True)

    print("\n| training (Adam, BCE, fp32, batch 8, 256x256) | ms/slice | peak RSS | vs plain |\n|---|---|---|---|")
    plain = None
    for name, checkpointing in (("plain", False), ("gradient checkpointing per level", True)):
        sec, rss = training(8, args.train_steps, args.threads, checkpointing)
        plain = plain or (sec, rss)
        print(f"| {name} | {sec * 1e3:.0f} | {rss:.2f} GiB | {sec / plain[0]:.2f}x time, {rss / plain[1]:.2f}x RSS |",
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        size_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
    print(f"\nmodel folder (safetensors + config): {size_mb:.1f} MB")

    if args.quality:
        q = quality(args.quality)
        print(f"\nquality, seg-cpu-small.yaml on {args.quality}: test Dice {q['dice']:.4f} (tumour slices "
              f"{q['dice_tumour']:.4f}), IoU {q['iou']:.4f}, FP rate {q['fp_rate']:.3f}, wall {q['wall_s'] / 60:.1f} "
              f"min ({q['run']})")
        args.model, args.data = args.model or q["run"], args.data or args.quality
    if args.model and args.data:
        agree = bf16_agreement(args.model, args.data)
        print(f"\nfp32 vs bf16 autocast inference of {args.model} on {agree['slices']} test slices: Dice vs truth "
              f"fp32 {agree['dice_fp32']:.4f}, bf16 {agree['dice_bf16']:.4f}; Dice(fp32 mask, bf16 mask) "
              f"{agree['dice_fp32_vs_bf16']:.4f}")
    print(f"\nmachine: shared with other jobs while measured (load average {open('/proc/loadavg').read().split()[0]})")


if __name__ == "__main__":
    main()
