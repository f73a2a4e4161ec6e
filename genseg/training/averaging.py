"""Weight averaging for the segmenter: an exponential moving average (EMA) of the weights, kept beside training,
is what validation scores and what the best state saves.

Why: with few patients and a learning rate that stays high for most of a budgeted run, the weights of any one step
fit the last batches; the average over the last few hundred steps is a smoother network that tends to generalise
better and to leave fewer stray specks (docs/recipe-benchmark.md measures it). diffusers' EMAModel keeps the
average (with its standard warm-up, decay = min(ema_decay, (1 + step) / (10 + step)), so early steps are not
averaged with the random start); it is saved in every checkpoint, so `--resume` continues the same average.
BatchNorm's running statistics are not averaged: the averaged network takes the training network's, or, with
`bn_stat_slices`, statistics recomputed for its own weights (batchnorm.py).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from .batchnorm import recompute_batchnorm_stats


class AveragedNetwork:
    """The EMA of `model`'s weights and a copy of the network that holds them for evaluation and saving."""

    def __init__(self, model: nn.Module, decay: float, frozen: list[nn.Module]):
        self.ema = EMAModel(model.parameters(), decay=decay)
        copies: dict = {}  # deepcopy's memo: original object id -> its copy
        self.network = copy.deepcopy(model, copies).eval().requires_grad_(False)
        self.frozen = [copies[id(module)] for module in frozen]  # the same layers in the copy

    def to(self, device: torch.device) -> AveragedNetwork:
        self.ema.to(device)
        self.network.to(device)
        return self

    def step(self, model: nn.Module) -> None:
        """Average in the weights of one more optimizer step."""
        self.ema.step(model.parameters())

    @torch.no_grad()
    def refresh(self, model: nn.Module, bn_batches: Sequence[torch.Tensor]) -> nn.Module:
        """The averaged network as of now: EMA weights, `model`'s BatchNorm buffers or statistics recomputed from
        `bn_batches`, in eval mode."""
        self.ema.copy_to(self.network.parameters())
        for mine, theirs in zip(self.network.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
        recompute_batchnorm_stats(self.network, bn_batches, self.frozen)
        return self.network.eval()
