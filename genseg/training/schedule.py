"""train-seg's learning-rate schedule: diffusers' schedule shapes over the run's progress, not over a step count.

With a time budget the number of optimizer steps a run will take is not known when it starts, so the schedule is
a function of progress p in [0, 1]: the largest of step / max_steps, elapsed / budget and step / (epochs x steps
per epoch) over the limits that are set, which reaches 1 when the first of them ends the run. Then

    lr = lr x warm-up(step) x shape(p),   warm-up(step) = min(1, (step + 1) / warmup_steps),

where shape is the multiplier of diffusers' `get_scheduler(name)` laid out over PROGRESS_TICKS steps, read at
floor(p x PROGRESS_TICKS) (polynomial with nnU-Net's power 0.9). Its only inputs, the step and the elapsed wall
time (validation included), are in the TrainState every checkpoint saves, so `--resume` continues at the point of
the schedule where the checkpoint was written. Without a time budget the schedule depends on the step alone and a
resumed run is bit-identical to an uninterrupted one; under a budget it follows the clock, like the step at which
the run ends. A limit changed on `--resume` (a longer budget, more epochs) moves the rest of the schedule to the
progress under the new limit; it does not restart it.
"""

from __future__ import annotations

import math

import torch
from diffusers.optimization import get_scheduler

from .loop import TrainState

POLY_POWER = 0.9  # nnU-Net's poly schedule: (1 - p) ** 0.9
PROGRESS_TICKS = 10_000  # resolution of the progress at which the diffusers shape is read


class ProgressSchedule:
    """lr x warm-up(step) x shape(progress), set on the optimizer before every step (module docstring)."""

    def __init__(self, name: str, lr: float, warmup_steps: int, *, max_steps: int | None = None,
                 time_budget_s: float | None = None, epoch_steps: int | None = None):
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only its multiplier is used
        self._shape = get_scheduler(name, probe, num_warmup_steps=0, num_training_steps=PROGRESS_TICKS,
                                    power=POLY_POWER).lr_lambdas[0]
        self.lr, self.warmup_steps = lr, warmup_steps
        self.max_steps, self.time_budget_s, self.epoch_steps = max_steps, time_budget_s, epoch_steps

    def progress(self, state: TrainState) -> float:
        """How far the run is towards the first of its limits, in [0, 1]."""
        shares = [state.step / limit for limit in (self.max_steps, self.epoch_steps) if limit]
        if self.time_budget_s:
            shares.append(state.elapsed_s / self.time_budget_s)
        return min(1.0, max(shares, default=0.0))

    def lr_at(self, state: TrainState) -> float:
        warmup = min(1.0, (state.step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.lr * warmup * self._shape(math.floor(self.progress(state) * PROGRESS_TICKS))

    def apply(self, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
        """Set the learning rate of the next step (call before the first step and after every step)."""
        lr = self.lr_at(state)
        for group in optimizer.param_groups:
            group["lr"] = lr
