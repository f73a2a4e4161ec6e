"""Segmentation training: the paper's U-Net on a prepared file, plugged into the shared loop (loop.py).

A run directory holds config.yaml (the resolved SegTrainConfig), run.json (data, synthetic provenance, precision
that actually ran), model/ (the best model by validation Dice or IoU, `save_pretrained`), checkpoints/ (last
training state per epoch, for `--resume`), log.csv, metrics.json (val and test scores of the best model) and
plots/. Validation and test data are always real; synthetic slices only ever enter training (see mixing.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import ConcatDataset, DataLoader

from ..data.prepared import PreparedDataset, read_metadata
from ..errors import ConfigError, DataError
from ..evaluation.evaluate import evaluate, plot_run
from ..evaluation.metrics import dice_from_counts, iou_from_counts
from ..io import atomic_path
from ..models.unet import SegmentationUNet
from ..runs import SegTrainConfig, check_resume, default_run_dir, refuse_to_overwrite, split_selection
from .averaging import AveragedNetwork
from .batchnorm import recompute_batchnorm_stats
from .loop import Hooks, Trainer, effective_precision, make_accelerator, start_run
from .mixing import MixSampler, Tagged, kept_patient_ids, select_synthetic, subsample_patients, tumour_slices
from .multiclass import class_loss, class_names, pixel_targets
from .schedule import ProgressSchedule
from .tracking import accelerator_tracking, finish_tracking, log_image_files, start_tracking
from .transfer import InitResult, initial_model, keep_frozen_eval

# May change on --resume: gradient_checkpointing is exact (e.g. after running out of memory); a changed limit
# (epochs, max_steps, time_budget) extends or shortens the run and moves the rest of its schedule (schedule.py);
# report_to only changes where the log is mirrored.
RESUMABLE_KEYS = {"epochs", "max_steps", "time_budget", "patience", "num_workers", "eval_batch_size", "plot_samples",
                  "gradient_checkpointing", "report_to"}


def seg_loss(logits: torch.Tensor, masks: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-slice loss (N,): BCE on logits (stable), soft Dice (smooth 1, so empty masks push towards 0), or both."""
    logits, masks = logits.float(), masks.float()
    dims = tuple(range(1, logits.ndim))
    loss = torch.zeros(logits.shape[0], device=logits.device)
    if "bce" in kind:
        loss = loss + F.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean(dims)
    if "dice" in kind:
        probs = torch.sigmoid(logits)
        soft_dice = (2 * (probs * masks).sum(dims) + 1) / (probs.sum(dims) + masks.sum(dims) + 1)
        loss = loss + 1 - soft_dice
    return loss


@dataclass
class SegData:
    """What one run trains and validates on, and the provenance recorded in run.json."""

    train: ConcatDataset
    sampler: MixSampler
    val: PreparedDataset
    channels: int
    bn_stats: PreparedDataset | None = None  # unaugmented real training slices for batchnorm.py; None = off
    info: dict = field(default_factory=dict)


def build_seg_data(cfg: SegTrainConfig, data: str | Path, synthetic: str | Path | None = None) -> SegData:
    """Real train/val sets from `data` (plus synthetic training slices), checked against the config."""
    attrs = read_metadata(data)["attrs"]
    if int(attrs["size"]) != cfg.size:
        raise ConfigError(f"size {cfg.size} does not match {data}, prepared at {attrs['size']}x{attrs['size']}; "
                          f"pass --size {attrs['size']} or prepare the data with --size {cfg.size}")
    if attrs.get("synthetic"):
        raise DataError(data, "is a synthetic file; --data must be real data (validation and test stay real), "
                              "pass synthetic slices with --synthetic")
    if cfg.synthetic_ratio > 0 and synthetic is None:
        raise ConfigError(f"synthetic_ratio {cfg.synthetic_ratio} needs a synthetic file (--synthetic SYNTH.h5)")
    num_folds = int(attrs["num_folds"])
    augment = cfg.augmentation()
    real = PreparedDataset(data, **split_selection(cfg.test_fold, num_folds, "train"))
    kept = subsample_patients(real.patients, cfg.real_fraction, cfg.seed)
    real = PreparedDataset(data, indices=real.rows[kept], transform=augment)
    val = PreparedDataset(data, **split_selection(cfg.test_fold, num_folds, "val"))
    if len(val) == 0:
        raise DataError(data, f"has no validation slices ({split_selection(cfg.test_fold, num_folds, 'val')})")
    info = {"data": str(Path(data).resolve()), "real_train_slices": len(real),
            "real_train_patients": int(len(set(real.patients.tolist()))),
            "kept_patients": kept_patient_ids(real.patients, cfg.real_fraction), "val_slices": len(val), "synthetic": None}
    parts = [Tagged(real, synthetic=False)]
    num_synthetic = 0
    if synthetic is not None:
        rows, info["synthetic"] = select_synthetic(synthetic, attrs, cfg.min_agreement, cfg.min_nn_ratio)
        info["synthetic"]["path"] = str(Path(synthetic).resolve())
        synth = PreparedDataset(synthetic, indices=rows, transform=augment)
        parts.append(Tagged(synth, synthetic=True))
        num_synthetic = len(synth)
    real_tumour = None if cfg.foreground_fraction is None else tumour_slices(data, real.rows)
    sampler = MixSampler(len(real), num_synthetic, cfg.synthetic_ratio, cfg.seed, real_tumour, cfg.foreground_fraction)
    info["epoch"] = {"length": len(sampler), "real": sampler.real_per_epoch, "synthetic": sampler.synthetic_per_epoch,
                     "synthetic_ratio": cfg.synthetic_ratio, "real_fraction": cfg.real_fraction}
    if cfg.foreground_fraction is not None:
        info["epoch"].update(foreground_fraction=cfg.foreground_fraction, real_with_tumour=sampler.tumour_per_epoch)
    if cfg.classes:
        info["class_names"] = _class_names(data, real, val, synthetic, parts)
    return SegData(ConcatDataset(parts), sampler, val, int(attrs["channels"]), _bn_stat_slices(cfg, data, real), info)


def _bn_stat_slices(cfg: SegTrainConfig, data: str | Path, real: PreparedDataset) -> PreparedDataset | None:
    """A fixed, seeded sample of `bn_stat_slices` real training slices, unaugmented (what evaluation sees)."""
    if cfg.bn_stat_slices == 0:
        return None
    count = min(cfg.bn_stat_slices, len(real))
    return PreparedDataset(data, indices=np.random.default_rng(cfg.seed).choice(real.rows, size=count, replace=False))


def _class_names(data: str | Path, real: PreparedDataset, val: PreparedDataset, synthetic: str | Path | None,
                 parts: list[Tagged]) -> list[str]:
    """--classes: the data's tumour class names, once every training and validation slice with tumour (synthetic
    ones too) is known to have one of them (training/multiclass.py's class_names)."""
    names = class_names(data, [real.rows, val.rows])
    if synthetic is not None:
        synth_names = class_names(synthetic, [parts[1].dataset.rows])
        if synth_names != names:
            raise DataError(synthetic, f"records tumour classes {synth_names}, the real data {data} {names}; "
                                       f"--classes needs the same classes in both")
    return names


def _check_resume(cfg: SegTrainConfig, out: Path, info: dict) -> None:
    """Refuse to continue a run with settings or data that differ from what it was started with."""
    old = check_resume(cfg, out, RESUMABLE_KEYS, "train-seg")
    old_synth = (old.get("synthetic") or {}).get("path")
    new_synth = (info.get("synthetic") or {}).get("path")
    if old["data"] != info["data"] or old_synth != new_synth:
        raise ConfigError(f"{out}: was trained on {old['data']} (synthetic {old_synth}); resume with the same files")


@dataclass
class SegRunResult:
    run_dir: Path
    metrics: dict  # best epoch, precision and (on the main process) val/test scores of the best model
    model: SegmentationUNet  # the network as training left it (last epoch), on every process


def train_segmenter(cfg: SegTrainConfig, data: str | Path, out: str | Path | None = None, resume: bool = False,
                    synthetic: str | Path | None = None, cpu: bool = False) -> SegRunResult:
    """Train, validate every epoch, keep the best model, then score it on the real val and test data."""
    out = Path(out) if out is not None else default_run_dir()
    seg_data = build_seg_data(cfg, data, synthetic)
    if resume:
        _check_resume(cfg, out, seg_data.info)
    else:
        refuse_to_overwrite(out)
    acc = make_accelerator(cfg.mixed_precision, cpu=cpu, seed=cfg.seed,
                           tracking=accelerator_tracking(cfg.report_to, out))
    set_seed(cfg.seed)
    init = _initial_network(cfg, seg_data, acc, resume)
    averaged = AveragedNetwork(init.model, cfg.ema_decay, init.frozen) if cfg.ema_decay else None
    trainer = _seg_trainer(cfg, seg_data, init.model, acc, out, averaged)
    val_loader = acc.prepare(DataLoader(seg_data.val, batch_size=cfg.eval_batch_size))
    seg_data.info.update(precision=effective_precision(acc), processes=acc.num_processes)
    start_run(trainer, cfg, seg_data.info, resume)
    if averaged is not None:
        averaged.to(acc.device)  # after a resume too: a checkpoint's average is read onto the CPU
    schedule = _lr_schedule(cfg, len(trainer.train_loader))
    schedule.apply(trainer.optimizer, trainer.state)  # a resumed run recomputes it from the checkpoint's state
    bn_batches = _bn_batches(seg_data, cfg, acc)

    def after_step(state):
        schedule.apply(trainer.optimizer, state)
        if averaged is not None:
            averaged.step(acc.unwrap_model(trainer.model))

    def evaluated() -> torch.nn.Module:
        """The network validation scores and the best state saves: the weight average when there is one."""
        return trainer.model if averaged is None else averaged.network

    def validate(state):
        model = acc.unwrap_model(trainer.model)
        if averaged is not None:
            return _validate(averaged.refresh(model, bn_batches), val_loader, cfg, acc)
        recompute_batchnorm_stats(model, bn_batches, init.frozen)
        return _validate(trainer.model, val_loader, cfg, acc)

    hooks = Hooks(after_step=after_step, after_epoch=validate, on_best=lambda state: _save_best(evaluated(), acc, out))
    start_tracking(acc, "train-seg", cfg)
    trainer.fit(functools.partial(_train_batch, cfg=cfg, frozen=init.frozen), max_epochs=cfg.epochs,
                max_steps=cfg.max_steps, time_budget_s=_budget_s(cfg), close_partial_epoch=True, hooks=hooks,
                desc=f"train-seg {out.name}")
    _say_where_the_budget_ended(cfg, trainer, acc)
    result = _seg_result(trainer, cfg, data, seg_data.info["precision"])
    log_image_files(acc, {path.stem: path for path in sorted((out / "plots").glob("samples_*.png"))}, trainer.state.step)
    finish_tracking(acc)
    return result


def _budget_s(cfg: SegTrainConfig) -> float | None:
    return None if cfg.time_budget is None else 60.0 * cfg.time_budget


def _lr_schedule(cfg: SegTrainConfig, batches_per_epoch: int) -> ProgressSchedule:
    return ProgressSchedule(cfg.lr_schedule, cfg.lr, cfg.warmup_steps, max_steps=cfg.max_steps,
                            time_budget_s=_budget_s(cfg),
                            epoch_steps=cfg.epochs * batches_per_epoch if cfg.epochs else None)


def _say_where_the_budget_ended(cfg: SegTrainConfig, trainer: Trainer, acc: Accelerator) -> None:
    """A budget that ran out inside the first epoch still gives a model (that epoch is closed and validated), but
    one that saw only part of the data once: say so, with what a longer budget would need."""
    state, budget_s = trainer.state, _budget_s(cfg)
    if budget_s is None or state.elapsed_s < budget_s:
        return
    acc.print(f"time budget {cfg.time_budget:g} min reached after {state.epoch} epoch(s), {state.step} steps, "
              f"{state.elapsed_s:.0f} s with validation")
    if state.epoch == 1 and state.step < len(trainer.train_loader):
        acc.print(f"note: the budget ended inside the first epoch ({state.step} of {len(trainer.train_loader)} "
                  f"batches); the saved model is that state, validated once. Give --time-budget several epochs' "
                  f"worth for a trained model.")


def _memory_format(cfg: SegTrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def _initial_network(cfg: SegTrainConfig, seg_data: SegData, acc: Accelerator, resume: bool) -> InitResult:
    """The U-Net to train, fresh or from `init_from` (recorded in run.json, its adaptations printed)."""
    init = initial_model(cfg, seg_data.channels, load=not resume,  # a bad --init-from / --freeze fails here
                         out_channels=1 + len(seg_data.info.get("class_names") or []))
    if cfg.gradient_checkpointing:
        init.model.enable_gradient_checkpointing()
    if init.info is not None:
        seg_data.info["init_from"] = init.info
    for message in init.messages:
        acc.print(message)
    init.model.to(memory_format=_memory_format(cfg))
    return init


def _seg_trainer(cfg: SegTrainConfig, seg_data: SegData, model: SegmentationUNet, acc: Accelerator,
                 out: Path, averaged: AveragedNetwork | None) -> Trainer:
    """Adam on the parameters that are not frozen, over the mixed epochs; stops early on the validation score;
    checkpoints hold the weight average too."""
    loader = DataLoader(seg_data.train, batch_size=cfg.batch_size, sampler=seg_data.sampler,
                        num_workers=cfg.num_workers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Trainer(acc, model, torch.optim.Adam(trainable, lr=cfg.lr), loader, out,
                   monitor=f"val_{cfg.monitor}", mode="max", patience=cfg.patience,
                   extra_state=None if averaged is None else {"ema": averaged.ema})


def _train_batch(model: SegmentationUNet, batch: dict, cfg: SegTrainConfig,
                 frozen: list[torch.nn.Module]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A batch's loss, and how many of its slices are real and synthetic (the epoch's sums go in its log row)."""
    keep_frozen_eval(frozen)  # the trainer's model.train() each epoch must not wake frozen BatchNorms
    images = batch["image"].contiguous(memory_format=_memory_format(cfg))
    synthetic = batch["synthetic"]
    loss = batch_loss(model(images), batch, cfg).mean()
    return loss, {"real_seen": (~synthetic).sum(), "synthetic_seen": synthetic.sum()}


def _bn_batches(seg_data: SegData, cfg: SegTrainConfig, acc: Accelerator) -> list[torch.Tensor]:
    """The images batchnorm.py recomputes BatchNorm statistics from, on the device (every process the same), in
    seeded random order like training batches: batches of neighbouring rows (one or two patients) would give too
    small a variance. Read by index, not through a DataLoader, whose iterator would draw from the global RNG that
    a resume restores."""
    if seg_data.bn_stats is None:
        return []
    order = np.random.default_rng(cfg.seed).permutation(len(seg_data.bn_stats))
    images = torch.stack([seg_data.bn_stats[int(i)]["image"] for i in order])
    return [batch.to(acc.device).contiguous(memory_format=_memory_format(cfg))
            for batch in images.split(cfg.eval_batch_size)]


@torch.no_grad()
def _validate(model: torch.nn.Module, val_loader: DataLoader, cfg: SegTrainConfig, acc: Accelerator) -> dict:
    """Loss, Dice and IoU on the real validation slices, every process's share gathered."""
    model.eval()
    if cfg.classes:
        return _validate_classes(model, val_loader, cfg, acc)
    rows = []
    for batch in val_loader:
        logits = model(batch["image"].contiguous(memory_format=_memory_format(cfg)))
        pred, target = torch.sigmoid(logits.float()) >= cfg.threshold, batch["mask"] > 0.5
        rows.append(torch.stack([seg_loss(logits, batch["mask"], cfg.loss), (pred & target).sum((1, 2, 3)),
                                 pred.sum((1, 2, 3)), target.sum((1, 2, 3))], dim=1).float())
    loss, inter, pred_sum, target_sum = acc.gather_for_metrics(torch.cat(rows)).cpu().numpy().T
    return {"val_loss": float(loss.mean()), "val_dice": float(dice_from_counts(inter, pred_sum, target_sum).mean()),
            "val_iou": float(iou_from_counts(inter, pred_sum, target_sum).mean())}


def batch_loss(logits: torch.Tensor, batch: dict, cfg: SegTrainConfig) -> torch.Tensor:
    """Per-slice loss: seg_loss on the binary masks, or with --classes class_loss (training/multiclass.py) on the
    typed ones."""
    if not cfg.classes:
        return seg_loss(logits, batch["mask"], cfg.loss)
    return class_loss(logits, batch["mask"], batch["label"], cfg.loss)


@torch.no_grad()
def _validate_classes(model: torch.nn.Module, val_loader: DataLoader, cfg: SegTrainConfig, acc: Accelerator) -> dict:
    """_validate for a --classes run: Dice and IoU of the binary tumour masks (argmax != 0), the score the best
    model is picked by, plus val_typed_dice, the Dice of the predicted against the true class-per-pixel masks over
    the foreground classes (pooled per slice)."""
    rows = []
    for batch in val_loader:
        logits = model(batch["image"].contiguous(memory_format=_memory_format(cfg))).float()
        classes, target = logits.argmax(1), pixel_targets(batch["mask"], batch["label"])
        pred, truth = classes > 0, target > 0
        typed = (classes == target) & truth
        rows.append(torch.stack([batch_loss(logits, batch, cfg), (pred & truth).sum((1, 2)), pred.sum((1, 2)),
                                 truth.sum((1, 2)), typed.sum((1, 2))], dim=1).float())
    loss, inter, pred_sum, target_sum, typed_inter = acc.gather_for_metrics(torch.cat(rows)).cpu().numpy().T
    return {"val_loss": float(loss.mean()), "val_dice": float(dice_from_counts(inter, pred_sum, target_sum).mean()),
            "val_iou": float(iou_from_counts(inter, pred_sum, target_sum).mean()),
            "val_typed_dice": float(dice_from_counts(typed_inter, pred_sum, target_sum).mean())}


def _save_best(model: torch.nn.Module, acc: Accelerator, out: Path) -> None:
    if acc.is_main_process:
        with atomic_path(out / "model", is_dir=True) as tmp:
            acc.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)


def _seg_result(trainer: Trainer, cfg: SegTrainConfig, data: str | Path, precision: str) -> SegRunResult:
    """The best epoch and its score; the main process adds the best model's val and test scores (finish_run) while
    the others wait, so that no process returns before the run's files are complete."""
    acc, state = trainer.accelerator, trainer.state
    metrics = {"best_epoch": state.best_epoch, f"best_val_{cfg.monitor}": state.best_metric,
               "epochs_run": state.epoch, "steps_run": state.step, "precision": precision,
               "train_seconds": state.elapsed_s}
    acc.wait_for_everyone()
    if acc.is_main_process:
        metrics.update(finish_run(trainer.run_dir, data, cfg))
    acc.wait_for_everyone()
    return SegRunResult(trainer.run_dir, metrics, acc.unwrap_model(trainer.model))


def finish_run(out: Path, data: str | Path, cfg: SegTrainConfig) -> dict:
    """Score the best model on the real val and test data, write metrics.json and the figures."""
    scores = {role: evaluate(out, data, split=role, progress=False) for role in ("val", "test")}
    plot_run(out, data, cfg)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(scores, indent=1))
    return scores


def cross_validate(cfg: SegTrainConfig, data: str | Path, out: str | Path, synthetic: str | Path | None = None,
                   folds: list[int] | None = None, cpu: bool = False) -> dict:
    """Train and test one run per fold (test = K, val = K % n + 1, train = rest) under out/fold-K; mean ± sd.

    Finished folds (metrics.json present) are reused and interrupted ones resumed, so re-running the same
    command after a crash loses nothing.
    """
    out = Path(out)
    num_folds = int(read_metadata(data)["attrs"]["num_folds"])
    per_fold = {}
    for k in folds or range(1, num_folds + 1):
        run = out / f"fold-{k}"
        if (run / "metrics.json").exists():
            per_fold[k] = json.loads((run / "metrics.json").read_text())["test"]
            continue
        resume = any((run / "checkpoints").glob("step-*"))
        result = train_segmenter(dataclasses.replace(cfg, test_fold=k), data, run, resume=resume,
                                 synthetic=synthetic, cpu=cpu)
        per_fold[k] = result.metrics["test"]
    keys = ("dice", "iou", "hd95", "dice_tumour", "patient_dice_mean", "fp_rate")
    summary = {"folds": list(per_fold), "per_fold": {str(k): v for k, v in per_fold.items()}}
    for key in keys:
        values = np.array([v[key] for v in per_fold.values() if v.get(key) is not None], dtype=np.float64)
        summary[key] = {"mean": float(values.mean()) if len(values) else None,
                        "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        "values": values.tolist()}
    table = ["| metric | mean ± sd | " + " | ".join(f"fold {k}" for k in per_fold) + " |",
             "|---|---|" + "---|" * len(per_fold)]
    for key in keys:
        s = summary[key]
        mean = "n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['sd']:.4f}"
        table.append(f"| {key} | {mean} | " + " | ".join(f"{v:.4f}" for v in s["values"]) + " |")
    summary["table"] = "\n".join(table)
    with atomic_path(out / "cv.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    with atomic_path(out / "cv.md") as tmp:
        tmp.write_text(summary["table"] + "\n")
    return summary
