"""The one training skeleton both trainers share: accelerate set-up, the run folder's start, the step loop,
atomic checkpoints with keep-last-K and `--resume`, a per-epoch and per-N-steps CSV log, and early stopping.

A trainer supplies `compute_loss(model, batch) -> (loss, logs)` and optional hooks; everything about devices,
mixed precision, gradient accumulation, clipping, logging and resuming lives here once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME, DataLoaderConfiguration
from accelerate.utils import load as weights_only_load
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import save_config
from ..errors import CheckpointError
from ..io import atomic_path, replace_path
from ..runs import CsvLog
from .tracking import log_row

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Counters that make a resumed run continue exactly where the checkpoint left it."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    batches_into_epoch: int = 0  # batches of the current epoch already consumed (step-based checkpoints)
    best_metric: float | None = None
    best_epoch: int = -1
    evals_since_best: int = 0
    elapsed_s: float = 0.0
    epoch_sums: dict = field(default_factory=dict)  # RunningSums of this epoch's batches so far, all processes
    row_sums: dict = field(default_factory=dict)  # and of the batches since the last per-N-steps log row


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1, cpu: bool = False, seed: int = 0,
                     tracking: dict[str, Any] | None = None) -> Accelerator:
    """An Accelerator whose data order is reproducible from `seed` (needed for exact resume); `tracking` as
    genseg.training.tracking.accelerator_tracking gives it."""
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        cpu=cpu,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        **(tracking or {}),
    )


def effective_precision(accelerator: Accelerator) -> str:
    """What actually runs: accelerate silently ignores fp16 on CPU, so say so instead of reporting 'fp16'."""
    requested = accelerator.mixed_precision
    if requested == "fp16" and accelerator.device.type == "cpu":
        return "no (fp16 requested; not supported on CPU, ran fp32)"
    return requested


class Checkpointer:
    """Atomic `accelerator.save_state` folders `checkpoints/step-XXXXXXXX`, keeping the newest `keep_last`.

    Extra stateful objects (e.g. diffusers' EMAModel) are stored as safetensors + JSON, never pickle.
    """

    def __init__(self, accelerator: Accelerator, directory: Path, keep_last: int = 2,
                 extra: dict[str, Any] | None = None):
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.keep_last = max(1, keep_last)
        self.extra = extra or {}

    def all(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("step-*") if (p / STATE_FILE).exists())

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: TrainState) -> Path:
        acc = self.accelerator
        final = self.directory / f"step-{state.step:08d}"
        tmp = self.directory / f".step-{state.step:08d}.tmp"
        if acc.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a killed save
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            for name, obj in self.extra.items():
                _save_state_dict(obj.state_dict(), tmp / name)
            (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
            replace_path(tmp, final)
            for old in self.all()[: -self.keep_last]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> TrainState:
        if not (path / STATE_FILE).exists():
            raise CheckpointError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
        self.accelerator.load_state(str(path))
        _check_rng_restored(path / f"{RNG_STATE_NAME}_{self.accelerator.process_index}.pkl")
        for name, obj in self.extra.items():
            obj.load_state_dict(_load_state_dict(path / name))
        saved = json.loads((path / STATE_FILE).read_text())
        return TrainState(**_sums_as_dicts(saved, self.accelerator.num_processes))


def _sums_as_dicts(saved: dict[str, Any], num_processes: int) -> dict[str, Any]:
    """A checkpoint written before the loop summed `compute_loss`'s logs holds its loss sums as three numbers:
    read them as the RunningSums they are, so that such a run also resumes exactly."""
    if "loss_sum" in saved:
        saved["epoch_sums"] = {"batches": saved["batches_into_epoch"] * num_processes, "loss": saved.pop("loss_sum")}
        saved["row_sums"] = {"batches": saved.pop("log_batches"), "loss": saved.pop("log_loss_sum")}
    return saved


class SavedGenerator:
    """A torch.Generator for a trainer's own random draws, saved in every checkpoint (pass it in `extra_state`).

    The global RNG that accelerate saves cannot make a mid-epoch resume exact: the data loader draws from it
    too, a batch ahead of the step and once per epoch for its workers' seeds, so after a resume the same draws
    would land on other batches.
    """

    def __init__(self, seed: int, device: str | torch.device = "cpu"):
        self.generator = torch.Generator(device).manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"])


def _check_rng_restored(file: Path) -> None:
    """accelerate's load_state skips an RNG file it cannot load or apply with only an info log, and the run would
    go on with other random draws than the one it resumes: refuse such a checkpoint, saying why."""
    try:
        saved = weights_only_load(file)  # accelerate's own reader: weights_only, so pickled code is refused
        numpy_state = np.random.get_state()
        restored = (random.getstate() == saved["random_state"]
                    and all(np.array_equal(a, b) for a, b in zip(numpy_state, saved["numpy_random_seed"], strict=True))
                    and torch.equal(torch.get_rng_state(), saved["torch_manual_seed"]))
    except Exception as exc:
        lines = str(exc).splitlines() or [""]
        if isinstance(exc, pickle.UnpicklingError):  # torch's message opens with advice to unpickle it anyway
            lines = [line for line in lines if "GLOBAL" in line] or lines
        raise CheckpointError(f"{file}: cannot restore the random-number state ({type(exc).__name__}: {lines[0]}); "
                              f"resuming without it would not continue the run exactly") from None
    if not restored:
        raise CheckpointError(f"{file}: its random-number state was not restored (accelerate could not apply it); "
                              f"resuming without it would not continue the run exactly")


def _save_state_dict(state: dict[str, Any], stem: Path) -> None:
    """Tensors (also inside lists) to `stem.safetensors`, everything else to `stem.json`."""
    tensors, plain = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            plain[key] = {"__tensor_list__": len(value)}
            for i, v in enumerate(value):
                tensors[f"{key}.{i}"] = v.detach().cpu().contiguous()
        else:
            plain[key] = value
    save_file(tensors, str(stem) + ".safetensors")
    Path(str(stem) + ".json").write_text(json.dumps(plain))


def _load_state_dict(stem: Path) -> dict[str, Any]:
    missing = [p.name for p in (Path(f"{stem}.safetensors"), Path(f"{stem}.json")) if not p.exists()]
    if missing:
        raise CheckpointError(f"{stem.parent}: incomplete training checkpoint, {' and '.join(missing)} missing "
                              f"(written by an older genseg?)")
    tensors = load_file(str(stem) + ".safetensors")
    state: dict[str, Any] = json.loads(Path(str(stem) + ".json").read_text())
    for key, value in list(state.items()):
        if isinstance(value, dict) and "__tensor_list__" in value:
            state[key] = [tensors[f"{key}.{i}"] for i in range(value["__tensor_list__"])]
    state.update({k: v for k, v in tensors.items() if "." not in k or k.rsplit(".", 1)[0] not in state})
    return state


@dataclass
class Hooks:
    """What a trainer plugs into `fit`. Every hook is optional.

    after_step(state): runs on every optimizer step (e.g. EMA update, periodic sampling).
    log_row(state) -> dict: more values for each per-N-steps log row (e.g. the EMA decay).
    after_epoch(state) -> dict: runs after each epoch (e.g. validation); its dict is logged, and the `monitor` key
        in it drives early stopping and `on_best`.
    on_best(state): the monitored metric improved (e.g. save the best model).
    """

    after_step: Callable[[TrainState], None] = lambda state: None
    log_row: Callable[[TrainState], dict] = lambda state: {}
    after_epoch: Callable[[TrainState], dict] = lambda state: {}
    on_best: Callable[[TrainState], None] = lambda state: None


class RunningSums:
    """The batch count, loss and `compute_loss`'s logs summed on the device, so that adding a batch never makes a
    step wait for it; they reach the host only through `take` and `totals`, once per log row or checkpoint, which
    every process calls at the same step.

    `saved` (a checkpoint's `totals`) carries on in the main process and as zeros in the others, so the sums over
    all processes go on from where the checkpoint left them.
    """

    def __init__(self, accelerator: Accelerator, saved: dict[str, float | int] | None = None):
        self.accelerator = accelerator
        start = {"batches": 0, "loss": 0.0, **(saved or {})}
        keep = accelerator.is_main_process
        self.sums = {k: torch.tensor(v if keep else type(v)(0), device=accelerator.device) for k, v in start.items()}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        self.sums["batches"] += 1
        for key, value in values.items():
            if key not in self.sums:  # counts stay whole numbers, the rest sums in float32 as the loss does
                dtype = torch.float32 if value.is_floating_point() else torch.int64
                self.sums[key] = torch.zeros((), dtype=dtype, device=self.accelerator.device)
            self.sums[key] += value.detach()

    def totals(self) -> dict[str, float | int]:
        """Each sum over every process, on the host."""
        return {k: v.sum().item() for k, v in self.accelerator.gather(self.sums).items()}

    def take(self) -> tuple[float, dict[str, float | int]]:
        """The mean loss per batch and the other logs' sums since the previous take; then start again from zero."""
        totals = self.totals()
        for value in self.sums.values():
            value.zero_()
        batches = totals.pop("batches")
        return totals.pop("loss") / max(1, batches), totals


class Trainer:
    """Runs the loop: accumulate, clip, step, log, checkpoint, stop early, resume.

    Every epoch ends with a log row (`train_loss` and `compute_loss`'s logs summed over the epoch, then what
    `after_epoch` returns); `log_every_steps` adds a row every N optimizer steps (`loss`, then `log_row`'s values
    and the logs' sums over those steps).
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_loader, run_dir: Path, *, lr_scheduler=None, max_grad_norm: float | None = None,
                 checkpoint_every_steps: int | None = None, log_every_steps: int | None = None, keep_last: int = 2,
                 extra_state: dict | None = None, monitor: str | None = None, mode: str = "max",
                 patience: int | None = None):
        self.accelerator = accelerator
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, train_loader)
        self.lr_scheduler = accelerator.prepare(lr_scheduler) if lr_scheduler is not None else None
        self.run_dir = Path(run_dir)
        self.max_grad_norm = max_grad_norm
        self.checkpoint_every_steps, self.log_every_steps = checkpoint_every_steps, log_every_steps
        self.checkpointer = Checkpointer(accelerator, self.run_dir / "checkpoints", keep_last, extra_state)
        self.log = CsvLog(self.run_dir / "log.csv")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.state = TrainState()
        self._epoch_sums, self._row_sums = RunningSums(accelerator), RunningSums(accelerator)

    def resume(self, checkpoint: Path | None = None) -> TrainState:
        """Load the given or the newest checkpoint in the run; a clear error when there is none."""
        checkpoint = checkpoint or self.checkpointer.latest()
        if checkpoint is None:
            raise CheckpointError(f"{self.run_dir}: nothing to resume (no checkpoint under {self.checkpointer.directory})")
        self.state = self.checkpointer.load(Path(checkpoint))
        self._epoch_sums = RunningSums(self.accelerator, self.state.epoch_sums)
        self._row_sums = RunningSums(self.accelerator, self.state.row_sums)
        if self.accelerator.is_main_process:
            self.log.truncate_after("step", self.state.step)
        return self.state

    def fit(self, compute_loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]], *,
            max_epochs: int | None = None, max_steps: int | None = None, time_budget_s: float | None = None,
            close_partial_epoch: bool = False, hooks: Hooks | None = None, desc: str = "train") -> TrainState:
        """Train until `max_epochs`, `max_steps` or `time_budget_s` (whichever comes first) or early stopping.

        `compute_loss(model, batch)` returns the batch's loss and a dict of detached tensors (e.g. counts) whose
        sums go in the log rows; nothing of a step is read on the host except at a log row or checkpoint.
        `state.elapsed_s` is the wall time spent in `fit` over all sessions of the run (validation and checkpoints
        included), kept current at every step, so a budget holds across `--resume`. A run that max_steps or the
        budget ends mid-epoch checkpoints there; with `close_partial_epoch` it closes that epoch early instead
        (log row, `after_epoch`, best model, checkpoint), so that its last steps are validated.
        """
        # --- set-up
        if max_epochs is None and max_steps is None and time_budget_s is None:
            raise ValueError("give max_epochs, max_steps or time_budget_s")
        hooks = hooks or Hooks()
        acc, state = self.accelerator, self.state
        max_epochs = max_epochs if max_epochs is not None else 10**9
        max_steps = max_steps if max_steps is not None else 10**12
        budgeted = time_budget_s is not None
        bar = tqdm(total=None if max_steps == 10**12 else max_steps, initial=state.step, desc=desc,
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        clock, elapsed_before = time.perf_counter(), state.elapsed_s

        def limit_reached() -> bool:
            state.elapsed_s = elapsed_before + time.perf_counter() - clock
            return state.step >= max_steps or (budgeted and self._agreed(state.elapsed_s >= time_budget_s))

        stop = limit_reached()  # decided once per clock read, so the checkpoint saved with a reading agrees with it
        while not (stop or state.epoch >= max_epochs or self._patience_exhausted()):
            for batch in self._epoch_batches():
                # --- one optimizer step (with gradient accumulation, one batch of it)
                with acc.accumulate(self.model):
                    loss, logs = compute_loss(self.model, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and self.max_grad_norm:
                        acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                    self.optimizer.step()
                    if self.lr_scheduler is not None:
                        self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                state.batches_into_epoch += 1
                self._epoch_sums.add({"loss": loss, **logs})
                if self.log_every_steps:
                    self._row_sums.add({"loss": loss, **logs})
                if not acc.sync_gradients:
                    continue
                state.step += 1
                bar.update(1)
                stop = limit_reached()
                hooks.after_step(state)
                # --- log every N steps
                if self.log_every_steps and (state.step % self.log_every_steps == 0 or state.step == max_steps):
                    mean_loss, log_sums = self._row_sums.take()
                    self._log({"loss": mean_loss, **hooks.log_row(state), **log_sums})
                    bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=state.epoch)
                # --- checkpoint mid-epoch (one due on the epoch's last batch waits for the epoch's end: its row,
                # hooks and early stopping, so that resuming from it starts the next epoch instead of replaying them)
                if state.batches_into_epoch < len(self.train_loader) and (
                        self._step_checkpoint_due() or (stop and not close_partial_epoch)):
                    self._save()
                if stop:
                    break
            if state.batches_into_epoch < len(self.train_loader) and not close_partial_epoch:
                break  # stopped mid-epoch on a limit: the checkpoint above holds this point
            # --- end of epoch (or of the part a limit left of it): log, validate, early stop
            mean_loss, log_sums = self._epoch_sums.take()
            state.epoch += 1
            state.batches_into_epoch = 0
            metrics = {"train_loss": mean_loss, **hooks.after_epoch(state), **log_sums}
            if self.monitor is not None:
                self._track_best(float(metrics[self.monitor]), hooks.on_best)
            self._log(metrics)
            bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=state.epoch)
            # --- checkpoint (the clock read after validation, so that a budget spent there is saved as spent)
            stop = limit_reached()
            if self.checkpoint_every_steps is None or self._step_checkpoint_due() or state.epoch >= max_epochs or stop:
                self._save()
        bar.close()
        return state

    def _epoch_batches(self):
        """The current epoch's batches in train mode (validation leaves eval mode), past those already trained on."""
        self.train_loader.set_epoch(self.state.epoch)
        self.model.train()
        if self.state.batches_into_epoch:
            return self.accelerator.skip_first_batches(self.train_loader, self.state.batches_into_epoch)
        return self.train_loader

    def _save(self) -> None:
        """A checkpoint that also holds the sums so far, so rows logged after a resume cover the same batches."""
        self.state.epoch_sums, self.state.row_sums = self._epoch_sums.totals(), self._row_sums.totals()
        self.checkpointer.save(self.state)

    def _agreed(self, flag: bool) -> bool:
        """True on every process when it is on the main one: processes' clocks differ, and all must stop at the
        same step (a gather per step only when a time budget is set)."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.gather(torch.tensor([flag], device=self.accelerator.device))[0])

    def _step_checkpoint_due(self) -> bool:
        return bool(self.checkpoint_every_steps) and self.state.step % self.checkpoint_every_steps == 0

    def _track_best(self, value: float, on_best: Callable[[TrainState], None]) -> None:
        """Early stopping's count of epochs since the monitored value last improved; `on_best` when it does."""
        state, best = self.state, self.state.best_metric
        if best is None or math.isnan(best):
            improved = not math.isnan(value)
        else:
            improved = value > best if self.mode == "max" else value < best
        if improved:
            state.best_metric, state.best_epoch, state.evals_since_best = value, state.epoch, 0
            on_best(state)
        else:
            state.evals_since_best += 1

    def _patience_exhausted(self) -> bool:
        return self.patience is not None and self.monitor is not None and self.state.evals_since_best >= self.patience

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        row = {"epoch": self.state.epoch, "step": self.state.step, **metrics, "lr": lr,
               "seconds": round(self.state.elapsed_s, 2)}
        self.log.append(row)
        log_row(self.accelerator, row, self.state.step)  # a tracker's copy; log.csv stays the record


def start_run(trainer: Trainer, cfg: Any, info: dict, resume: bool) -> None:
    """A new run writes its config.yaml and run.json (which `--resume` checks against); a resumed one loads its
    newest checkpoint."""
    if resume:
        trainer.resume()
    elif trainer.accelerator.is_main_process:
        save_config(cfg, trainer.run_dir / "config.yaml")
        with atomic_path(trainer.run_dir / "run.json") as tmp:
            tmp.write_text(json.dumps(info, indent=1))
