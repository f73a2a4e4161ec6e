"""`genseg demo`: the first command a new user runs. Does mixing synthetic slices into training help the segmenter?

Stages (each one's outputs live in the demo folder; a finished stage is reused when the command is repeated with
the same settings, and everything after a stage that had to be redone is redone too; `force` starts afresh):
  data       the embedded demo dataset (`genseg demo-data`, Figshare layout)       -> raw/
  prepare    prepared at the generator's size (`genseg prepare`)                  -> demo.h5
  generator  the shipped pipeline (or `--pipeline`), or with from_scratch a new
             generator trained with configs/diffusion-cpu-small.yaml              -> diffusion/ (from scratch)
  sample     as many synthetic slices as the real training split, DPM-Solver++     -> synthetic.h5, synthetic_grid.png
  seg-real   a real-only segmenter (configs/seg-demo.yaml)                         -> seg-real/
  quality    evaluate_synthetic with the real-only segmenter                       -> quality.json, synthetic_quality.png
  seg-mixed  the same segmenter with synthetic_ratio 0.5                           -> seg-mixed/
  pipeline   generate-then-segment 16 slices with the mixed segmenter              -> pipeline/
  report     the comparison on the real test split                                 -> report.md, comparison.png

The helpers `ensure_demo_data`, `ensure_prepared`, `ensure_diffusion`, `ensure_segmenter`, `load_generator` and
`sample_synthetic` are shared with scripts/train_demo_checkpoints.py and scripts/study_synthetic_ratio.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import builtin_config, load_config
from ..data.demo import make_demo_dataset
from ..data.prepare import prepare
from ..data.prepared import read_metadata
from ..errors import CheckpointError, ConfigError
from ..io import atomic_path
from ..pipeline.diffusion import SamplingSettings, SliceDiffusionPipeline, load_diffusion, model_channels
from ..runs import SegTrainConfig
from ..training.loop import STATE_FILE
from ..training.seg import train_segmenter

SEG_DEMO_CONFIG = builtin_config("seg-demo")
DIFFUSION_CPU_CONFIG = builtin_config("diffusion-cpu-small")
BUDGET_S = 600  # the demo's promise on 2 CPU cores
BUSY_CORES = 0.5  # cores other processes may take while the plan times the models before it says so
DEMO_DATA_S_PER_SLICE = 0.05  # demo-data seconds per 256 px slice on 2 CPU cores; scales with pixels
GRID_SLICES = 16
STAGES_FILE = "stages.json"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where training and sampling run (accelerate's pick too)


@dataclass
class DemoSettings:
    """What the demo builds; TINY is the same code path in seconds (tests, CI)."""

    patients: int = 30
    slices_per_patient: int = 8
    raw_size: int = 256  # demo-data is rendered at this size, then prepared at the generator's
    seed: int = 0
    sample_steps: int = 20  # DPM-Solver++ steps for the synthetic set and the pipeline
    synthetic_ratio: float = 0.5
    pipeline_slices: int = 16
    seg_overrides: dict = field(default_factory=dict)  # on top of configs/seg-demo.yaml
    diffusion_overrides: dict = field(default_factory=dict)  # on top of configs/diffusion-cpu-small.yaml

    @property
    def sampling(self) -> SamplingSettings:
        """The sampler of the synthetic set and of the pipeline stage."""
        return SamplingSettings(steps=self.sample_steps, seed=self.seed)


TINY = DemoSettings(patients=10, slices_per_patient=2, raw_size=64, sample_steps=2, pipeline_slices=4,
                    seg_overrides={"base_channels": 4, "depth": 2, "epochs": 1, "batch_size": 4, "plot_samples": 1},
                    diffusion_overrides={"model": {"sample_size": 32, "block_out_channels": [8, 16],
                                                   "norm_num_groups": 4, "mode": "joint"},
                                         "max_steps": 2, "batch_size": 4, "lr_warmup_steps": 1,
                                         "checkpoint_every_steps": 2, "sample_every_steps": 0})


# --- stage helpers shared with the scripts ---------------------------------------------------------------------


def ensure_demo_data(raw: Path, patients: int = 30, slices_per_patient: int = 8, size: int = 256, seed: int = 0,
                     progress: bool = True) -> Path:
    """The demo dataset in `raw` (`genseg demo-data RAW --seed SEED`); an existing one is reused (it is written
    atomically, so a folder that exists is complete)."""
    if not (Path(raw) / "cvind.mat").is_file():
        make_demo_dataset(raw, patients, slices_per_patient, size, seed=seed, force=True, progress=progress)
    return Path(raw)


def ensure_prepared(raw: Path, path: Path, size: int, progress: bool = True) -> Path:
    """`genseg prepare RAW --out PATH --size SIZE`, reused when PATH exists (written atomically)."""
    if not Path(path).is_file():
        prepare(raw, path, size=size, progress=progress)
    return Path(path)


def diffusion_checkpoint_step(run: Path) -> int:
    """Optimizer steps of the newest complete checkpoint of a train-diffusion run (0 when there is none)."""
    steps = [int(p.name[5:]) for p in (Path(run) / "checkpoints").glob("step-*")
             if p.name[5:].isdigit() and (p / STATE_FILE).exists()]
    return max(steps, default=0)


def ensure_diffusion(cfg, data: Path, run: Path, cpu: bool = False) -> Path:
    """Train a generator in `run` up to `cfg.max_steps`: reused when it got there, resumed (with the run's own
    config, only max_steps changed) when it stopped earlier, started otherwise."""
    from ..pipeline.diffusion import is_diffusion_run
    from ..runs import resolve_config
    from ..training.diffusion import DiffusionTrainConfig, train_diffusion

    done = diffusion_checkpoint_step(run)
    if done >= cfg.max_steps and is_diffusion_run(run):
        return Path(run)
    if done:
        cfg = resolve_config(DiffusionTrainConfig, None, {"max_steps": cfg.max_steps}, run, resume=True)
    train_diffusion(cfg, data, run, resume=bool(done), cpu=cpu)
    return Path(run)


def ensure_segmenter(cfg: SegTrainConfig, data: Path, run: Path, synthetic: Path | None = None,
                     cpu: bool = False) -> dict:
    """metrics.json (val and test scores) of a train-seg run: reused when finished, resumed when interrupted."""
    metrics = Path(run) / "metrics.json"
    if not metrics.exists():
        resume = any((Path(run) / "checkpoints").glob("step-*"))
        train_segmenter(cfg, data, run, resume=resume, synthetic=synthetic, cpu=cpu)
    return json.loads(metrics.read_text())


def seg_demo_config(**overrides) -> SegTrainConfig:
    return load_config(SegTrainConfig, SEG_DEMO_CONFIG, overrides)


def training_length(cfg: SegTrainConfig) -> str:
    """What ends a segmenter's training, in words: '2.5 min budget', '15 epochs', or both."""
    limits = [f"{cfg.time_budget:g} min budget" if cfg.time_budget is not None else "",
              f"{cfg.epochs} epochs" if cfg.epochs is not None else "",
              f"{cfg.max_steps} steps" if cfg.max_steps is not None else ""]
    return ", at most ".join(limit for limit in limits if limit)


def load_generator(path: str | Path, device: str | None = None) -> SliceDiffusionPipeline:
    """The generator of a saved GenSegPipeline folder (its unet + scheduler) or of a train-diffusion run."""
    return load_diffusion(path, device or DEVICE)


def sample_synthetic(generator: SliceDiffusionPipeline, out: Path, num: int,
                     sampling: SamplingSettings = SamplingSettings(), *, source: str | Path = "",
                     grid: Path | None = None) -> Path:
    """`num` slices sampled with `sampling` written as a synthetic prepared file, plus a grid of the first 16."""
    from ..viz import overlay, save_grid
    from .sampling import sample_into

    result = sample_into(generator, num, out, source, sampling)
    if grid is not None:
        shown = range(min(GRID_SLICES, num))
        tiles = [overlay(result.images[i], result.masks[i]) if result.masks is not None else result.images[i]
                 for i in shown]
        save_grid(tiles, grid, ncols=int(math.ceil(math.sqrt(len(tiles)))))
    return Path(out)


# --- the time budget --------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Seconds of the fastest of `repeats` calls of `fn` after one warm-up call (GPU work waited for): a busy
    moment on a shared machine slows single calls, and the fastest one is the machine's own speed."""
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


class OtherLoad:
    """Context manager: how many CPU cores other processes kept busy while the block ran (`cores`; None where
    /proc/stat is missing). Timed model steps slow down many times when another process takes a core from
    torch's threads, so the plan says when its timings were taken on a busy machine."""

    cores: float | None = None

    def __enter__(self) -> "OtherLoad":
        self._start = (_busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        if busy is not None and self._start[0] is not None and wall > self._start[2]:
            self.cores = max(0.0, ((busy - self._start[0]) - (own - self._start[1])) / (wall - self._start[2]))


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(ticks[i] for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def measure_generator(unet, batch: int = 16) -> float:
    """Seconds per image per denoising step of `unet` on this machine (one forward pass of a sampling batch)."""
    size, channels = int(unet.config.sample_size), int(unet.config.in_channels)
    x = torch.randn(batch, channels, size, size, device=unet.device, dtype=unet.dtype)
    labels = (torch.full((batch,), int(unet.config.num_class_embeds) - 1, device=unet.device)
              if unet.config.num_class_embeds else None)
    with torch.no_grad():
        return _timed(lambda: unet(x, 500, class_labels=labels)) / batch


def measure_diffusion_step(cfg) -> float:
    """Seconds per optimizer step of a fresh generator of `cfg` (forward + backward of one batch)."""
    from ..models.diffusion import build_scheduler, build_unet
    from ..training.diffusion import diffusion_loss

    unet, scheduler, m = build_unet(cfg.model).to(DEVICE), build_scheduler(cfg.model), cfg.model
    size, extra = m.unet_size, int(unet.config.in_channels) - int(unet.config.out_channels)
    x0 = torch.rand(cfg.batch_size, int(unet.config.out_channels), size, size, device=DEVICE) * 2 - 1  # denoised
    condition = None  # mask-conditioned and inpaint: clean input channels (mask; blanked image, region, mask)
    if extra:
        condition = (torch.rand(cfg.batch_size, extra, size, size, device=DEVICE) > 0.9).float() * 2 - 1
    labels = torch.zeros(cfg.batch_size, dtype=torch.long, device=DEVICE) if m.num_classes else None
    return _timed(lambda: diffusion_loss(unet, scheduler, x0, labels, cfg, condition=condition).backward())


def measure_segmenter_batch(cfg: SegTrainConfig, channels: int = 1) -> float:
    """Seconds per training batch of a fresh segmenter of `cfg` (forward + backward)."""
    from ..models.unet import SegmentationUNet
    from ..training.seg import seg_loss

    model = SegmentationUNet(in_channels=channels, base_channels=cfg.base_channels, depth=cfg.depth,
                             sample_size=cfg.size).to(DEVICE)
    x = torch.rand(cfg.batch_size, channels, cfg.size, cfg.size, device=DEVICE)
    y = (torch.rand(cfg.batch_size, 1, cfg.size, cfg.size, device=DEVICE) > 0.9).float()
    return _timed(lambda: seg_loss(model(x), y, cfg.loss).mean().backward())


# --- the demo ---------------------------------------------------------------------------------------------------


@dataclass
class _Stage:
    """One step of the demo. `params` (or the function returning them, for settings that exist only once the
    earlier stages ran) feed the stage's reuse key; `clear=False` keeps the outputs of an unfinished run for
    `fn` to resume (generator training)."""

    name: str
    what: str
    params: dict | Callable[[], dict]
    outputs: list[Path]
    fn: Callable[[], Any]
    clear: bool = True


class _Stages:
    """Runs stages in order and records them in DIR/stages.json with a key chained over all earlier stages'
    settings: a finished stage is reused only when its outputs exist, neither it nor anything it depends on
    changed, and no earlier stage had to run again."""

    def __init__(self, out: Path, echo: Callable[[str], None]):
        self.out, self.echo = out, echo
        self.file = out / STAGES_FILE
        self.record = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.chain = ""
        self.redone = False  # once a stage runs, every later one runs too
        self.rows: list[dict] = []
        self.results: dict[str, Any] = {}

    def _key(self, chain: str, stage: _Stage) -> str:
        params = stage.params() if callable(stage.params) else stage.params
        return hashlib.sha1(json.dumps([chain, stage.name, params], sort_keys=True, default=str).encode()).hexdigest()

    def _reusable(self, stage: _Stage, key: str) -> bool:
        old = self.record.get(stage.name)
        return bool(old) and old["key"] == key and all(p.exists() for p in stage.outputs)

    def will_run(self, stages: list[_Stage]) -> list[str]:
        """Names of the stages `run` will run rather than reuse, decided before anything runs."""
        chain = ""
        for i, stage in enumerate(stages):
            chain = self._key(chain, stage)
            if not self._reusable(stage, chain):
                return [s.name for s in stages[i:]]
        return []

    def run(self, stage: _Stage, expected_s: float | None) -> Any:
        self.chain = key = self._key(self.chain, stage)
        if not self.redone and self._reusable(stage, key):
            old = self.record[stage.name]
            self.echo(f"[{stage.name}] reused: finished before in {old['seconds']:.0f} s")
            self.rows.append({"stage": stage.name, "expected_s": None, "seconds": old["seconds"], "reused": True})
            self.results[stage.name] = old["result"]
            return old["result"]
        for path in stage.outputs if stage.clear else []:  # leftovers of an interrupted or outdated run
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.echo(f"[{stage.name}] {stage.what} (expected ~{expected_s:.0f} s)")
        self.redone = True
        start = time.perf_counter()
        result = stage.fn()
        seconds = round(time.perf_counter() - start, 1)
        self.echo(f"[{stage.name}] done in {seconds:.0f} s")
        self.record[stage.name] = {"key": key, "seconds": seconds, "result": result}
        with atomic_path(self.file) as tmp:
            tmp.write_text(json.dumps(self.record, indent=1))
        self.rows.append({"stage": stage.name, "expected_s": expected_s, "seconds": seconds, "reused": False})
        self.results[stage.name] = result
        return result


def _prepare_out(out: Path, force: bool) -> None:
    """A new folder, or one a previous demo wrote (stages.json); never silently anything else."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / STAGES_FILE).exists():
        raise ConfigError(f"--out {out}: folder holds files that no `genseg demo` wrote; choose another --out")
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def generator_source(pipeline: str | Path | None, from_scratch: bool = False) -> Path | None:
    """The folder to sample from: `pipeline`, else the shipped demo pipeline (a clear error when it is missing);
    None with `from_scratch` (the generator is trained in the demo folder)."""
    from . import pipeline_run

    if from_scratch:
        if pipeline is not None:
            raise ConfigError("give --pipeline or --from-scratch, not both")
        return None
    path = Path(pipeline) if pipeline is not None else pipeline_run.DEMO_PIPELINE
    if pipeline is None and not (path / "model_index.json").is_file():
        raise ConfigError(f"no shipped demo generator at {path} (make it with scripts/train_demo_checkpoints.py); "
                          f"pass --pipeline DIR (a saved pipeline or a train-diffusion run) or --from-scratch")
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"--pipeline {path}: not a saved pipeline or train-diffusion run (no model_index.json)")
    return path


def _fingerprint(path: Path) -> dict:
    """Identity of a model folder for the stage keys: its path and its weight files' sizes and times."""
    return {"path": str(path.resolve()), "weights": sorted((str(p.relative_to(path)), p.stat().st_size,
                                                            int(p.stat().st_mtime))
                                                           for p in path.rglob("*.safetensors"))}


def run_demo(out: str | Path = "demo", *, pipeline: str | Path | None = None, from_scratch: bool = False,
             diffusion_steps: int | None = None, force: bool = False, tiny: bool = False,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or finish) the demo in `out` and return its summary; writes out/report.md (module docstring)."""
    from ..training.diffusion import DiffusionTrainConfig

    settings = TINY if tiny else DemoSettings()
    source = generator_source(pipeline, from_scratch)
    diffusion_cfg = None
    if from_scratch:
        overrides = dict(settings.diffusion_overrides)
        if diffusion_steps is not None:
            overrides["max_steps"] = diffusion_steps
        diffusion_cfg = load_config(DiffusionTrainConfig, DIFFUSION_CPU_CONFIG, overrides)
    out = Path(out)
    _prepare_out(out, force)
    started = time.perf_counter()

    if source is not None:
        unet = load_generator(source).unet
        size = int(unet.config.sample_size)
        image_channels, _ = model_channels(unet)
    else:
        unet = None
        size, image_channels = diffusion_cfg.model.sample_size, diffusion_cfg.model.image_channels
    if image_channels != 1:
        raise ConfigError(f"the demo data is grey MRI; the generator makes {image_channels}-channel images")
    seg_cfg = seg_demo_config(seed=settings.seed, size=size, **settings.seg_overrides)
    mixed_cfg = dataclasses.replace(seg_cfg, synthetic_ratio=settings.synthetic_ratio)
    raw, data, synthetic = out / "raw", out / "demo.h5", out / "synthetic.h5"
    generator_dir = out / "diffusion" if source is None else source
    if source is None:
        generator = _Stage("generator", f"train the generator for {diffusion_cfg.max_steps} steps (cpu-small config)",
                           {"config": dataclasses.asdict(diffusion_cfg)}, [generator_dir],
                           lambda: str(ensure_diffusion(diffusion_cfg, data, generator_dir)), clear=False)
    else:
        generator = _Stage("generator", f"use the generator in {source}", _fingerprint(source), [],
                           lambda: str(source))
    stages = [
        _Stage("data", f"demo data: {settings.patients} patients x {settings.slices_per_patient} slices",
               {"patients": settings.patients, "slices": settings.slices_per_patient, "size": settings.raw_size,
                "seed": settings.seed}, [raw],
               lambda: str(ensure_demo_data(raw, settings.patients, settings.slices_per_patient, settings.raw_size,
                                            settings.seed))),
        _Stage("prepare", f"prepare at {size} px", {"size": size}, [data],
               lambda: str(ensure_prepared(raw, data, size))),
        generator,
        _Stage("sample", f"sample as many synthetic slices as real training slices (DPM-Solver++, "
                         f"{settings.sample_steps} steps)",
               lambda: {"num": _train_count(data), "steps": settings.sample_steps, "seed": settings.seed},
               [synthetic, out / "synthetic_grid.png"],
               lambda: str(sample_synthetic(load_generator(generator_dir), synthetic, _train_count(data),
                                            settings.sampling, source=generator_dir,
                                            grid=out / "synthetic_grid.png"))),
        _Stage("seg-real", f"train the real-only segmenter ({training_length(seg_cfg)})",
               {"config": dataclasses.asdict(seg_cfg)}, [out / "seg-real"],
               lambda: ensure_segmenter(seg_cfg, data, out / "seg-real")),
        _Stage("quality", "evaluate the synthetic set with the real-only segmenter", {},
               [out / "quality.json", out / "synthetic_quality.png"],
               lambda: _quality(synthetic, data, out / "seg-real", out)),
        _Stage("seg-mixed", f"train the mixed segmenter (synthetic ratio {settings.synthetic_ratio})",
               {"config": dataclasses.asdict(mixed_cfg)}, [out / "seg-mixed"],
               lambda: ensure_segmenter(mixed_cfg, data, out / "seg-mixed", synthetic=synthetic)),
        _Stage("pipeline", f"generate and segment {settings.pipeline_slices} slices with the mixed segmenter", {},
               [out / "pipeline"], lambda: _run_pipeline(generator_dir, out / "seg-mixed", out / "pipeline", settings)),
        # `summary` is assembled below once the stages before this one have run
        _Stage("report", "write report.md and comparison.png", {}, [out / "report.md", out / "comparison.png"],
               lambda: _report(out, summary, runner.rows)),
    ]
    runner = _Stages(out, echo)
    running = runner.will_run(stages)
    with OtherLoad() as load:
        expected = _expected_seconds(running, settings, seg_cfg, unet, diffusion_cfg, echo)
    total = sum(expected.values())
    echo(f"genseg demo -> {out}  ({'tiny CI mode, ' if tiny else ''}generator "
         f"{source if source is not None else 'trained from scratch'})")
    echo("plan (expected seconds on this machine, measured from a few timed model steps, for the stages that run):")
    for stage in stages:
        echo(f"  {stage.name:<10} " + (f"~{expected[stage.name]:6.0f} s" if stage.name in expected
                                       else "reused (finished before)"))
    above = total > BUDGET_S and source is not None
    echo(f"  {'total':<10} ~{total:6.0f} s" + (f"  -- above the {BUDGET_S // 60}-minute budget: is the CPU busy?"
                                                if above else ""))
    if load.cores is not None and load.cores >= BUSY_CORES:
        echo(f"  note: other processes kept {load.cores:.1f} of {os.cpu_count()} CPU cores busy while the models "
             f"were timed; these estimates hold only while that lasts (on an idle machine the stages run faster)")
    for stage in stages[:-1]:
        runner.run(stage, expected.get(stage.name))
    results = runner.results
    num_train = _train_count(data)
    summary = {"out": str(out), "tiny": tiny, "generator": str(generator_dir), "size": size,
               "real_train_slices": num_train, "synthetic_slices": num_train,
               "synthetic_ratio": settings.synthetic_ratio, "seg_config": dataclasses.asdict(seg_cfg),
               "test": {"real-only": results["seg-real"]["test"], "mixed": results["seg-mixed"]["test"]},
               "quality": results["quality"], "pipeline": results["pipeline"],
               "seconds_so_far": round(time.perf_counter() - started, 1)}
    runner.run(stages[-1], expected.get("report"))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["table"] = comparison_table(summary["test"])
    echo(summary["table"])
    echo(f"wall time {summary['seconds']:.0f} s; report: {out / 'report.md'}")
    return summary


def _train_count(data: Path) -> int:
    return int((read_metadata(data)["split"] == "train").sum())


def _expected_seconds(running: list[str], settings: DemoSettings, seg_cfg: SegTrainConfig, unet, diffusion_cfg,
                      echo: Callable[[str], None]) -> dict[str, float]:
    """Expected seconds of the stages in `running`, from model steps timed on this machine; only what those
    stages need is timed (a fully reused demo times nothing). `unet` is the shipped generator, None with
    `diffusion_cfg` (from scratch)."""
    from ..models.diffusion import build_unet

    train_slices = round(settings.patients * settings.slices_per_patient * 3 / 5)  # 3 of the 5 patient folds
    raw_slices = settings.patients * settings.slices_per_patient

    @functools.cache
    def sample_s() -> float:
        return measure_generator(unet if unet is not None else build_unet(diffusion_cfg.model))

    @functools.cache
    def seg_s() -> float:
        budget_s = math.inf if seg_cfg.time_budget is None else 60 * seg_cfg.time_budget
        if seg_cfg.epochs is None and seg_cfg.max_steps is None:
            return budget_s + 5  # the budget alone ends the run: nothing to time
        batches = min(seg_cfg.epochs * math.ceil(train_slices / seg_cfg.batch_size) if seg_cfg.epochs else math.inf,
                      seg_cfg.max_steps or math.inf)
        return min(batches * measure_segmenter_batch(seg_cfg) * 1.4, budget_s) + 5

    def generator_s() -> float:
        if diffusion_cfg is None:
            return 1
        step_s = measure_diffusion_step(diffusion_cfg)
        seconds = step_s * diffusion_cfg.max_steps * 1.1
        echo(f"--from-scratch: training the generator takes about {seconds / 60:.1f} min here "
             f"(measured {step_s:.2f} s/step x {diffusion_cfg.max_steps} steps), before the rest of the demo")
        return seconds

    estimates = {
        "data": lambda: raw_slices * DEMO_DATA_S_PER_SLICE * (settings.raw_size / 256) ** 2 + 2,
        "prepare": lambda: 0.005 * raw_slices * (settings.raw_size / 256) ** 2 + 1,
        "generator": generator_s,
        "sample": lambda: train_slices * settings.sample_steps * sample_s() + 3,
        "seg-real": seg_s,
        "quality": lambda: 2,
        "seg-mixed": seg_s,
        "pipeline": lambda: settings.pipeline_slices * settings.sample_steps * sample_s() + 5,
        "report": lambda: 1,
    }
    return {name: estimates[name]() for name in running}


def _quality(synthetic: Path, data: Path, seg_run: Path, out: Path) -> dict:
    from ..evaluation.synthetic_quality import evaluate_synthetic

    result = evaluate_synthetic(synthetic, data, seg_run, out_dir=out)
    with atomic_path(out / "quality.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    keys = ("nn_ratio_median", "near_copy_percent", "real_near_copy_percent", "kid_mean", "kid_std",
            "kid_real_reference", "kid_real_reference_std", "agreement_dice_mean", "agreement_real_reference",
            "tumour_slice_share")
    return {k: result[k] for k in keys}


def _run_pipeline(generator_dir: Path, seg_run: Path, out: Path, settings: DemoSettings) -> dict:
    from ..inference.segmenter import load_segmenter
    from ..pipeline.genseg_pipeline import GenSegPipeline
    from .pipeline_run import run_pipeline

    generator = load_generator(generator_dir)
    seg = load_segmenter(seg_run, device="cpu")
    pipe = GenSegPipeline(unet=generator.unet, scheduler=generator.scheduler, segmenter=seg.model,
                          threshold=seg.threshold).to(generator.device)
    summary = run_pipeline(pipe, out, num=settings.pipeline_slices, sampling=settings.sampling, force=True)
    return {k: v for k, v in summary.items() if k != "slices"}


def comparison_table(test: dict[str, dict]) -> str:
    """Markdown: Dice, IoU, HD95 and the tumour-free false-positive rate of each segmenter on the real test split."""

    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = ["| segmenter | test Dice | test IoU | HD95 (px) | FP rate (tumour-free) |", "|---|---|---|---|---|"]
    for name, s in test.items():
        lines.append(f"| {name} | {fmt(s.get('dice'))} | {fmt(s.get('iou'))} | {fmt(s.get('hd95'))} | "
                     f"{fmt(s.get('fp_rate'))} |")
    return "\n".join(lines)


def _report(out: Path, summary: dict, rows: list[dict]) -> str:
    from ..evaluation.synthetic_quality import kid_reading
    from ..viz import plot_bars
    from .pipeline_run import CAPTION_LEGEND

    test = summary["test"]
    plot_bars({"real test split": (["Dice", "IoU"], {name: [s["dice"], s["iou"]] for name, s in test.items()})},
              out / "comparison.png", ylabel="score", title="real-only vs mixed segmenter")
    q = summary["quality"]
    delta = test["mixed"]["dice"] - test["real-only"]["dice"]
    cfg = summary["seg_config"]
    times = ["| stage | expected (s) | took (s) |", "|---|---|---|"]
    times += [f"| {r['stage']} | reused | {r['seconds']:.0f} (earlier run) |" if r["reused"] else
              f"| {r['stage']} | {r['expected_s']:.0f} | {r['seconds']:.0f} |" for r in rows]
    kid = "n/a" if q["kid_mean"] is None else f"{1e3 * q['kid_mean']:.2f} ± {1e3 * q['kid_std']:.2f}"
    kid_ref = ("n/a" if q["kid_real_reference"] is None
               else f"{1e3 * q['kid_real_reference']:.2f} ± {1e3 * q['kid_real_reference_std']:.2f}")
    reading = kid_reading(q["kid_mean"], q["kid_std"], q["kid_real_reference"], q["kid_real_reference_std"])
    agreement = "n/a" if q["agreement_dice_mean"] is None else f"{q['agreement_dice_mean']:.3f}"
    agreement_ref = "n/a" if q.get("agreement_real_reference") is None else f"{q['agreement_real_reference']:.3f}"
    lines = [
        "# genseg demo report", "",
        ("**Tiny CI mode**: a smoke run; the numbers mean nothing.\n\n" if summary["tiny"] else "") +
        f"Generator: `{summary['generator']}` ({summary['size']} px). Both segmenters: configs/seg-demo.yaml "
        f"(width {cfg['base_channels']}, depth {cfg['depth']}, {cfg['loss']}, "
        f"{training_length(SegTrainConfig(**cfg))}, "
        f"patience {cfg['patience']}, seed {cfg['seed']}); the mixed one draws {100 * summary['synthetic_ratio']:.0f} % "
        f"of every epoch from {summary['synthetic_slices']} synthetic slices (epochs keep the real-only length, "
        f"{summary['real_train_slices']} slices). Validation and test are real.", "",
        "## Real-only vs mixed on the real test split", "",
        comparison_table(test), "",
        f"Mixed minus real-only Dice: {delta:+.4f}. One seed on a small test split: differences of a few "
        "hundredths are within seed-to-seed noise; scripts/study_synthetic_ratio.py measures it over seeds, "
        "ratios and real-data fractions.", "",
        "![comparison](comparison.png)", "",
        "## The synthetic set", "",
        f"- nearest-neighbour ratio to the real training set (median; ~1 = as far as an unseen patient, 0 = a copy): "
        f"{q['nn_ratio_median']:.3f}; near-copies {q['near_copy_percent']} % (real held-out reference "
        f"{q['real_near_copy_percent']} %)",
        f"- KID x 1e3 (real-only segmenter's features): synthetic {kid}, real held-out reference {kid_ref}" +
        (f"; {reading}" if reading else ""),
        f"- Dice of generated masks vs the real-only segmenter's predictions: {agreement} (the same segmenter on "
        f"real held-out slices: {agreement_ref})",
        f"- share of slices with a tumour: synthetic {q['tumour_slice_share']['synthetic']}, "
        f"real {q['tumour_slice_share']['real']}", "",
        "![synthetic slices](synthetic_grid.png)", "", "![synthetic quality](synthetic_quality.png)", "",
        "## Generate-then-segment (mixed segmenter)", "",
        f"{summary['pipeline']['num_slices']} generated slices, {summary['pipeline']['slices_with_predicted_tumour']} "
        f"with a predicted tumour" + (f"; mean Dice generated vs predicted mask "
                                      f"{summary['pipeline']['mean_dice_generated_vs_predicted']:.3f}"
                                      if "mean_dice_generated_vs_predicted" in summary["pipeline"] else "") +
        ". Details: [pipeline/report.md](pipeline/report.md).", "",
        "![pipeline contact sheet](pipeline/contact_sheet.png)", "", CAPTION_LEGEND, "",
        "## Time", "", *times, "",
        f"Wall time of this invocation up to the report: {summary['seconds_so_far']:.0f} s. Re-running "
        "`genseg demo` reuses finished stages; `--force` redoes everything.", "",
    ]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
    return str(out / "report.md")
