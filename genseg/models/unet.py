"""The segmentation U-Net of the paper: Ronneberger's U-Net with zero-padded convolutions and BatchNorm.

Per level two 3x3 convolutions (padding 1, so sizes never shrink and skips concatenate without cropping), each
followed by BatchNorm and ReLU; 2x2 max-pooling down; a 2x2 transposed convolution up that halves the channels;
64 -> 128 -> 256 -> 512 -> 1024 filters; a 1x1 output convolution. At the defaults that is 23 convolution
layers and 31.0 M parameters (the paper's 118 MB of fp32 weights).

`forward` returns logits, because BCE on logits (`BCEWithLogitsLoss`) is numerically stable where BCE on
sigmoid outputs is not; `predict_proba` applies the sigmoid for the probabilities users see. A head of
out_channels = K + 1 > 1 (`train-seg --classes`, genseg/training/multiclass.py) is a softmax over background and K
tumour classes instead, and `predict_proba` applies the softmax.
It is a diffusers `ModelMixin`/`ConfigMixin`, so `save_pretrained`/`from_pretrained` give a safetensors folder
and a diffusers pipeline can register it as a module.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class DoubleConv(nn.Sequential):
    """(3x3 conv, zero padding -> BatchNorm -> ReLU) x 2. No conv bias: BatchNorm's shift replaces it."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then the level's double convolution (channels double)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """2x2 transposed conv halving the channels, concatenation with the encoder skip, double convolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


@contextmanager
def _batchnorm_stats_kept(module: nn.Module):
    """Restores every BatchNorm's running statistics on exit: a checkpointed block runs its forward twice in
    training mode, and the recomputation must not count the batch a second time."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def checkpoint_block(block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """Activation checkpointing of one U-Net block that is exact for BatchNorm: the batch statistics are
    recomputed from the same input and the running statistics are updated once, as without checkpointing."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False,
                                             context_fn=lambda: (nullcontext(), _batchnorm_stats_kept(block)))


class SegmentationUNet(ModelMixin, ConfigMixin):
    """U-Net for binary segmentation (out_channels 1) or background + K classes (out_channels K + 1, softmax);
    input sides must be divisible by 2**depth.

    sample_size is the side the model was trained at; it is recorded so a saved model folder says which
    preprocessing its inputs need (the network itself accepts any size divisible by 2**depth).
    `enable_gradient_checkpointing()` keeps only each level's input for the backward pass and recomputes the
    rest (less training memory for about one more forward pass per step).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 64, depth: int = 4,
                 sample_size: int = 256):
        super().__init__()
        widths = [base_channels * 2**level for level in range(depth + 1)]  # 64 ... 1024 at the defaults
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """diffusers' switch, with a checkpoint function that keeps BatchNorm's running statistics exact."""
        super().enable_gradient_checkpointing(gradient_checkpointing_func or checkpoint_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, out_channels, H, W) for images (N, in_channels, H, W)."""
        skips = self.encode(x)
        x = skips.pop()
        for up in self.ups:
            x = self._block(up, x, skips.pop())
        return self.outc(x)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps, one per level, finest first; the last is the bottleneck (the skips the
        decoder uses, and features for synthetic-data quality measures)."""
        self._check_input(x)
        levels = [self._block(self.inc, x)]
        for down in self.downs:
            levels.append(self._block(down, levels[-1]))
        return levels

    def _block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def fold_batchnorm(self) -> "SegmentationUNet":
        """An inference copy with every BatchNorm folded into the conv before it (same outputs to float
        rounding, one pass over memory less per layer: ~1.1x faster on CPU). The copy is in eval mode; this model
        and its saved weights are untouched."""
        folded = copy.deepcopy(self).eval()
        for block in folded.modules():
            if isinstance(block, DoubleConv):
                for i in (0, 3):  # conv, BN, ReLU, conv, BN, ReLU
                    block[i] = fuse_conv_bn_eval(block[i], block[i + 1])
                    block[i + 1] = nn.Identity()
        return folded

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel tumour probabilities in [0, 1] (sigmoid of the logits); with K + 1 > 1 output channels the
        softmax over background and the K classes."""
        if self.config.out_channels > 1:
            return torch.softmax(self(x), dim=1)
        return torch.sigmoid(self(x))

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected images of shape (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        multiple = 2**cfg.depth
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by 2**depth = {multiple}; "
                             f"resize to a multiple of {multiple} (e.g. {cfg.sample_size}x{cfg.sample_size})")
