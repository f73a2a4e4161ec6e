"""Benchmark of the paper's segmentation U-Net on this machine's CPU (issue 4, Performance), in one run.

Prints: the measured fp32 matmul peak; inference ms/slice and achieved GFLOPS at 256x256 for eager NCHW,
channels_last and bf16 autocast; training ms/slice and peak RSS at batch 8 (each in a fresh subprocess, so the
RSS is training's own); the saved model's size. With --quality DATA.h5 it trains configs/seg-cpu-small.yaml on
that file (CLI, as a user would) and reports test Dice and wall time, then the Dice of that model's fp32 vs bf16
masks on the test split (or of --model RUN_DIR on --data DATA.h5).

Then the ONNX Runtime rows (issue 18; --onnx runs only these): ms/slice of the PyTorch fp32 path (`Segmenter`),
ONNX Runtime fp32 and ONNX Runtime int8 (`export-onnx --int8`), each ratio to PyTorch measured in the same run, at
batch 1 and 8 and 1 and 2 threads, for the untrained paper U-Net at --onnx-sizes (speed does not depend on the
weights) and for each trained --onnx-model RUN DATA.h5 at its own size, with the int8 export's Dice change on
DATA's test and validation splits (the export's accuracy check). --block-amx first forbids the process AMX tiles,
to show what the int8 speed owes to AMX rather than to AVX-512 VNNI.

    genseg demo-data demo/raw && genseg prepare demo/raw --out demo/demo.h5 --size 128
    PYTHONPATH=$PWD python3 scripts/bench_segmenter.py --quality demo/demo.h5
    genseg prepare demo/raw --out demo/demo64.h5 --size 64
    PYTHONPATH=$PWD python3 scripts/bench_segmenter.py --onnx --onnx-model checkpoints/demo/pipeline demo/demo64.h5
"""

from __future__ import annotations

import argparse
import ctypes
import json
import struct
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
    from genseg.evaluation.metrics import dice_iou
    from genseg.inference.segmenter import load_segmenter

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


ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1022, 0x1023, 18  # x86-64 Linux


def block_amx() -> None:
    """Install a seccomp filter under which arch_prctl(ARCH_REQ_XCOMP_PERM) fails with EPERM: Linux grants AMX
    tiles only on that request, so neither oneDNN nor ONNX Runtime can use AMX and they fall back to AVX-512."""
    def op(code: int, jump_true: int, jump_false: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jump_true, jump_false, k)

    load_word, jump_equal, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    program = b"".join([op(load_word, 0, 0, 0), op(jump_equal, 0, 3, ARCH_PRCTL),  # seccomp_data.nr
                        op(load_word, 0, 0, 16), op(jump_equal, 0, 1, ARCH_REQ_XCOMP_PERM),  # args[0]
                        op(ret, 0, 0, 0x00050000 | 1),  # SECCOMP_RET_ERRNO | EPERM
                        op(ret, 0, 0, 0x7FFF0000)])  # SECCOMP_RET_ALLOW
    buffer = ctypes.create_string_buffer(program)

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(Program(len(program) // 8, ctypes.addressof(
            buffer))), 0, 0):  # PR_SET_NO_NEW_PRIVS, then PR_SET_SECCOMP with SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "could not install the seccomp filter")


def amx_granted() -> bool:
    """Whether a library in this process has asked Linux for AMX tiles and got them."""
    permitted = ctypes.c_ulong(0)
    ctypes.CDLL(None).syscall(ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(permitted))
    return bool(permitted.value >> XFEATURE_XTILEDATA & 1)


ONNX_BATCHES, ONNX_THREADS = (1, 8), (1, 2)


def onnx_exports(run_dir: Path, data: str | None, work: Path) -> tuple[str, dict[str, str], str]:
    """(fp32 export, {weight format: int8 export}, int8 Dice note) of one segmenter, for each int8 weight format
    this CPU can run accurately (u8u8 always; u8s8 with VNNI): with `data`, `export-onnx --int8` calibrated on it,
    whose accuracy check here reports instead of refusing; without, an untrained model's int8 export calibrated on
    random images."""
    from genseg.inference.onnx import cpu_features, int8_format
    from genseg.workflows.export import export_onnx
    from genseg.serve.testing import make_untrained_int8

    formats = sorted({"u8u8", int8_format("auto", cpu_features())}, reverse=True)
    fp32 = export_onnx(run_dir, work / "fp32.onnx")["path"]
    if not data:
        return fp32, {f: str(make_untrained_int8(run_dir, weight_format=f, out=work / f"{f}.onnx")) for f in formats}, \
            "untrained, speed only"
    int8, notes = {}, []
    for f in formats:
        exported = export_onnx(run_dir, work / f"{f}.onnx", int8=True, calibration=data, max_dice_change=1.0,
                               weight_format=f)
        guard = exported["guard"]["splits"]
        int8[f] = exported["path"]
        notes.append(f"{f} {guard['test']['dice_change']:+.4f} / {guard['val']['dice_change']:+.4f} (fp32 vs int8 "
                     f"masks {guard['test']['mask_dice_fp32_vs_int8']:.3f})")
    return fp32, int8, "; ".join(notes)


def onnx_table(sizes: list[int], trained: list[list[str]], repeats: int) -> None:
    """ms/slice of PyTorch fp32 (`Segmenter`), ONNX Runtime fp32 and int8 (each weight format this CPU runs
    accurately) at each batch and thread count, for untrained paper U-Nets at `sizes` and each trained (RUN, DATA)
    at its own size; ratios to PyTorch."""
    from genseg.inference.onnx import OnnxSegmenter
    from genseg.inference.segmenter import load_segmenter
    from genseg.serve.testing import make_untrained_segmenter

    header = False
    with tempfile.TemporaryDirectory() as tmp:
        models = [("paper U-Net", make_untrained_segmenter(Path(tmp) / f"paper{size}", size=size, base_channels=64,
                                                           depth=4), None) for size in sizes]
        models += [(str(run), Path(run), data) for run, data in trained]
        for k, (label, run_dir, data) in enumerate(models):
            (Path(tmp) / str(k)).mkdir()
            fp32, int8, note = onnx_exports(run_dir, data, Path(tmp) / str(k))
            if not header:
                print("\n| model | px | batch | threads | PyTorch fp32 ms/slice | ORT fp32 ms/slice | "
                      + " | ".join(f"ORT int8 {f} ms/slice" for f in int8) + " | int8 Dice change test / val |\n|"
                      + "---|" * (7 + len(int8)), flush=True)
                header = True
            segmenter = load_segmenter(run_dir, device="cpu")
            for threads in ONNX_THREADS:
                torch.set_num_threads(threads)
                engines = {"torch": segmenter, "ort_fp32": OnnxSegmenter(fp32, threads=threads),
                           **{f: OnnxSegmenter(path, threads=threads) for f, path in int8.items()}}
                for batch in ONNX_BATCHES:
                    x = torch.rand(batch, segmenter.channels, segmenter.size, segmenter.size).numpy()
                    t = {name: timed(lambda e=e: e.predict(x), repeats) / batch for name, e in engines.items()}
                    cells = " | ".join(f"{t[name] * 1e3:.0f} ({t['torch'] / t[name]:.2f}x)" for name in engines
                                       if name != "torch")
                    print(f"| {label} | {segmenter.size} | {batch} | {threads} | {t['torch'] * 1e3:.0f} | {cells} | "
                          f"{note} |", flush=True)


def pytorch_benchmark(args) -> None:
    """The PyTorch sections: matmul peak, inference variants, training, model size, quality and bf16 Dice."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=4, help="inference batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--model", help="trained run for the fp32 vs bf16 Dice (needs --data)")
    parser.add_argument("--data", help="prepared file for --model")
    parser.add_argument("--quality", help="prepared file: train seg-cpu-small.yaml on it, report Dice and time")
    parser.add_argument("--onnx", action="store_true", help="only the ONNX Runtime fp32 / int8 rows")
    parser.add_argument("--onnx-sizes", type=int, nargs="*", default=[128, 256],
                        help="sides of the untrained paper U-Nets in the ONNX rows")
    parser.add_argument("--onnx-model", nargs=2, action="append", default=[], metavar=("RUN", "DATA"),
                        help="a trained segmenter and its prepared file: ONNX rows with the int8 Dice change")
    parser.add_argument("--block-amx", action="store_true", help="forbid AMX tiles to this process first")
    args = parser.parse_args()
    if args.block_amx:
        block_amx()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from genseg.inference.onnx import cpu_features

    print(f"CPU features: {' '.join(cpu_features())}{' (AMX blocked)' if args.block_amx else ''}", flush=True)
    if not args.onnx:
        pytorch_benchmark(args)
    onnx_table(args.onnx_sizes, args.onnx_model, args.repeats)
    print(f"\nAMX tiles granted to this process (a library asked for them): {'yes' if amx_granted() else 'no'}")
    print(f"\nmachine: shared with other jobs while measured (load average {open('/proc/loadavg').read().split()[0]})")


if __name__ == "__main__":
    main()
