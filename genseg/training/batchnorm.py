"""Precise BatchNorm statistics: before a model is evaluated, recompute each BatchNorm layer's running mean and
variance from a fixed sample of training slices, with the weights as they are now.

Why: BatchNorm normalises with the batch's own statistics in training but with exponential running averages
(momentum 0.1) in evaluation. When the weights move fast (a high learning rate, few steps per epoch, small batches)
those averages describe the network of several steps ago, and the evaluation-mode network can be far worse than
the training loss says: a validation score that swings from epoch to epoch, a best model picked by luck, stray
specks on tumour-free slices (docs/recipe-benchmark.md). Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021),
call the fix precise BatchNorm. torch.optim.swa_utils.update_bn does the same for a whole model; this version
leaves the layers a transfer run froze (transfer.py) at the source model's statistics.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .transfer import keep_frozen_eval


@torch.no_grad()
def recompute_batchnorm_stats(model: nn.Module, batches: Sequence[torch.Tensor],
                              frozen: list[nn.Module] | None = None) -> None:
    """Replace the running statistics of every BatchNorm in `model` outside `frozen` by their average over
    `batches` (input tensors), then restore the model's mode; no batches leave the running averages as they are.
    Every process that sees the same batches gets the same statistics."""
    if not batches:
        return
    frozen = frozen or []
    frozen_layers = {id(layer) for module in frozen for layer in module.modules()}
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in frozen_layers]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches, not an exponential one
    was_training = model.training
    model.train()
    keep_frozen_eval(frozen)
    for images in batches:
        model(images)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.train(was_training)
