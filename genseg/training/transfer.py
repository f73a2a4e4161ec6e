"""Starting a segmentation run from a trained segmenter (`train-seg --init-from`, the paper's "foundation model"),
and a diffusion run from a trained generator (`train-diffusion --init-from`, `initial_unet` below).

The source is anything `genseg.inference.segmenter.load_segmenter` reads: a train-seg run directory, its model/ folder, or a
saved generate-then-segment pipeline folder (its `segmenter/` module). Its weights are copied into the new run's
network before any training step, so the first forward pass equals the source model's. Then:

- channels (the first convolution is the only layer that sees them): 1 -> C repeats the kernel over the C
  inputs divided by C; C -> 1 sums the kernel over its C inputs. Both keep the response to a grey image
  identical: a grey picture given to a colour model is C identical planes x, and sum_c (w_c * x) = (sum_c w_c) * x,
  which is what the summed 1-channel kernel gives for x (and w/C repeated C times gives w * x back the other way).
  Any other pair (e.g. 2 -> 3) has no such rule and is refused;
- image size: nothing to do, the network is fully convolutional; the new size only has to be divisible by
  2**depth (SegTrainConfig checks that);
- width, depth or output channels differing from the run's config: refused, naming both architectures.

`freeze` keeps parts of the network at the source's values: "encoder" = the first block and every
down-sampling level except the deepest, "encoder+bottleneck" = all of them; the decoder and output layer
always train. Frozen parameters get requires_grad False, and frozen modules stay in eval mode during training
(`keep_frozen_eval`), so their BatchNorm layers normalise with the source's running statistics and never
update them: a frozen part computes exactly what it computed in the source model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..inference.segmenter import load_segmenter
from ..models.unet import SegmentationUNet
from ..runs import FREEZE_PARTS

ARCHITECTURE_KEYS = ("base_channels", "depth", "out_channels")


def describe(config) -> str:
    """One line naming a SegmentationUNet's architecture, as both sides of a mismatch error show it."""
    return "SegmentationUNet(" + ", ".join(f"{k}={config[k]}" for k in ("in_channels", *ARCHITECTURE_KEYS,
                                                                         "sample_size")) + ")"


def load_source(path: str | Path) -> SegmentationUNet:
    """The trained SegmentationUNet at `path` (run dir, model/ folder or pipeline folder), on the CPU, eval mode."""
    if not Path(path).exists():
        raise CheckpointError(f"--init-from {path}: not found (expected a train-seg run directory, its model/ "
                              f"folder, or a saved pipeline folder with segmenter/)")
    try:
        return load_segmenter(path, device="cpu").model
    except CheckpointError as exc:
        raise CheckpointError(f"--init-from: {exc}") from None


def adapt_first_conv(weight: torch.Tensor, channels: int) -> tuple[torch.Tensor, str | None]:
    """The first conv's kernel (out, in, k, k) for `channels` inputs, and what was done (None: nothing)."""
    have = weight.shape[1]
    if have == channels:
        return weight, None
    if have == 1:
        return weight.repeat(1, channels, 1, 1) / channels, (
            f"first convolution adapted from 1 to {channels} input channels: kernel repeated and divided by "
            f"{channels}, so a grey image given as {channels} equal channels gives the source's response")
    if channels == 1:
        return weight.sum(dim=1, keepdim=True), (
            f"first convolution adapted from {have} to 1 input channel: kernel summed over the {have} channels, "
            f"so a grey image gives the response the source gave to it as {have} equal channels")
    raise ConfigError(f"--init-from: cannot adapt a model with {have} input channels to data with {channels}; "
                      f"only 1 -> N (repeat) and N -> 1 (sum) keep a defined response")


def frozen_modules(model: SegmentationUNet, part: str) -> list[nn.Module]:
    """The modules `part` freezes (see the module docstring)."""
    if part not in FREEZE_PARTS:
        raise ConfigError(f"freeze: unknown part {part!r}; choose one of {list(FREEZE_PARTS)}")
    if part == "none":
        return []
    downs = list(model.downs) if part == "encoder+bottleneck" else list(model.downs)[:-1]
    return [model.inc, *downs]


def freeze(model: SegmentationUNet, part: str) -> list[nn.Module]:
    """Freeze `part` in place (requires_grad False, eval mode); returns the frozen modules for keep_frozen_eval."""
    modules = frozen_modules(model, part)
    for module in modules:
        module.requires_grad_(False)
        module.eval()
    return modules


def keep_frozen_eval(modules: list[nn.Module]) -> None:
    """Put frozen modules back in eval mode after the trainer's model.train() (cheap: flags only)."""
    for module in modules:
        module.eval()


@dataclass
class InitResult:
    model: SegmentationUNet
    frozen: list[nn.Module] = field(default_factory=list)
    info: dict | None = None  # run.json's "init_from" record; None for a run from scratch
    messages: list[str] = field(default_factory=list)  # what to print and log


def initial_model(cfg, channels: int, load: bool = True, out_channels: int = 1) -> InitResult:
    """The network a run starts from: fresh, or the `cfg.init_from` source's weights adapted to this run.

    `load=False` builds the same architecture and freezing without reading the source (a resumed run gets its
    weights from its checkpoint, so the source may since have moved).
    """
    model = SegmentationUNet(in_channels=channels, out_channels=out_channels, base_channels=cfg.base_channels,
                             depth=cfg.depth, sample_size=cfg.size)
    result = InitResult(model)
    if cfg.init_from is None:
        return result
    if load:
        source = load_source(cfg.init_from)
        src_cfg = dict(source.config)
        mismatched = [k for k in ARCHITECTURE_KEYS if src_cfg[k] != model.config[k]]
        if mismatched:
            raise ConfigError(f"--init-from {cfg.init_from}: holds {describe(src_cfg)}, this run builds "
                              f"{describe(model.config)}; {', '.join(mismatched)} differ and cannot be adapted "
                              f"(set base_channels: {src_cfg['base_channels']} and depth: {src_cfg['depth']} in the "
                              f"run's config to fine-tune it)")
        state = source.state_dict()
        state["inc.0.weight"], adapted = adapt_first_conv(state["inc.0.weight"], channels)
        model.load_state_dict(state)
        messages = [f"init-from {cfg.init_from}: {describe(src_cfg)}"]
        messages.append(adapted or f"input channels: {channels} in both, nothing to adapt")
        size_note = (f"image size {src_cfg['sample_size']} -> {cfg.size}: nothing to adapt (fully convolutional; "
                     f"{cfg.size} is divisible by 2**depth = {2 ** cfg.depth})"
                     if src_cfg["sample_size"] != cfg.size else f"image size {cfg.size} in both")
        messages.append(size_note)
        result.messages = messages
        result.info = {"source": str(Path(cfg.init_from).resolve()), "source_architecture": describe(src_cfg),
                       "channels": [int(src_cfg["in_channels"]), channels], "channel_adaptation": adapted,
                       "size": [int(src_cfg["sample_size"]), cfg.size], "size_note": size_note}
    result.frozen = freeze(model, cfg.freeze)
    if cfg.freeze != "none":
        frozen_count = sum(p.numel() for m in result.frozen for p in m.parameters())
        total = sum(p.numel() for p in model.parameters())
        note = (f"freeze {cfg.freeze}: {frozen_count} of {total} parameters frozen (requires_grad False; BatchNorm "
                f"kept in eval mode, its running statistics stay the source's)")
        result.messages.append(note)
        if result.info is not None:
            result.info.update(freeze=cfg.freeze, frozen_parameters=frozen_count, total_parameters=total)
    elif result.info is not None:
        result.info["freeze"] = "none"
    return result


DENOISER_ARCHITECTURE_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                              "attention_head_dim", "norm_num_groups", "time_embedding_type")


def initial_unet(cfg, load: bool = True) -> InitResult:
    """The denoiser a diffusion run starts from: fresh, or (`cfg.init_from`) a trained generator's weights to
    continue on new data. The source is a train-diffusion run or a saved pipeline folder.

    The channel layout (joint image + mask, mask-conditioned, inpaint or image only; image channels) and the class
    count must match the new run's: there is no weight surgery that turns one into the other with a defined
    meaning. A size change needs nothing (the UNet is convolutional and attention takes any number of positions); any other
    architecture difference is refused naming both sides. `load=False` (a resumed run) skips the source.
    """
    from ..models.diffusion import build_unet
    from ..pipeline.diffusion import load_diffusion, model_layout

    unet = build_unet(cfg.model)
    result = InitResult(unet)
    if cfg.init_from is None or not load:
        return result
    path = Path(cfg.init_from)
    if not path.exists():
        raise CheckpointError(f"--init-from {path}: not found (expected a train-diffusion run directory or a "
                              f"saved pipeline folder)")
    try:
        source = load_diffusion(path).unet
    except CheckpointError as exc:
        raise CheckpointError(f"--init-from: {exc}") from None

    def layout(model) -> str:
        channels, mode = model_layout(model)
        kind = {"joint": "joint (image + mask)", "image": "image-only", "mask-conditioned": "mask-conditioned",
                "inpaint": "inpaint"}[mode]
        classes = (model.config.num_class_embeds or 1) - 1
        return (f"{kind} generator, {channels} image channel(s), "
                f"{classes} class(es)")

    if layout(source) != layout(unet):
        raise ConfigError(f"--init-from {path}: holds a {layout(source)}, but this run trains a {layout(unet)}; "
                          f"set model.mode, image_channels and num_classes to the source's to continue it")
    def plain(value):  # a loaded config holds lists where a fresh one holds tuples
        return list(value) if isinstance(value, (list, tuple)) else value

    differing = [k for k in DENOISER_ARCHITECTURE_KEYS if plain(source.config[k]) != plain(unet.config[k])]
    if differing:
        both = "; ".join(f"{k}: source {plain(source.config[k])} vs run {plain(unet.config[k])}" for k in differing)
        raise ConfigError(f"--init-from {path}: architectures differ ({both}); copy the source's model: section")
    unet.load_state_dict(source.state_dict())
    sizes = (int(source.config.sample_size), int(unet.config.sample_size))
    size_note = (f"image size {sizes[0]} -> {sizes[1]}: nothing to adapt (convolutional UNet)" if sizes[0] != sizes[1]
                 else f"image size {sizes[1]} in both")
    result.messages = [f"init-from {path}: {layout(source)}", size_note]
    result.info = {"source": str(path.resolve()), "layout": layout(source), "size": list(sizes), "size_note": size_note}
    return result
