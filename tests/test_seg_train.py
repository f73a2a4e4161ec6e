"""train-seg: the loop learns, resumes after a kill, runs on two processes, mixes synthetic data as asked,
cross-validates, and refuses bad settings with clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from seg_helpers import cli_env, kill_after_first_checkpoint, one_torch_thread, write_phantoms, write_synthetic  # noqa: F401 (autouse fixture)

from genseg.data.prepared import PreparedDataset
from genseg.errors import CheckpointError, ConfigError, DataError
from genseg.evaluation.evaluate import evaluate
from genseg.evaluation.metrics import dice_iou
from genseg.inference.segmenter import Segmenter
from genseg.runs import CsvLog, SegTrainConfig
from genseg.training.mixing import MixSampler, subsample_patients
from genseg.training.seg import cross_validate, train_segmenter

TINY = dict(size=32, base_channels=4, depth=2, batch_size=4, epochs=1, patience=None, hflip=False, max_rotation=0.0,
            plot_samples=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("seg") / "real.h5", n=40, size=32, patients=10)


def test_overfits_eight_slices(tmp_path):
    """8 training slices (5 with tumour), 64 px, 80 steps: the loop must drive training Dice above 0.9. At lr 1e-2
    and 2 steps per epoch BatchNorm's running averages lag the weights (half of 12 seed/thread runs scored 0.61-0.87
    in eval mode), so the run recomputes them before validating (bn_stat_slices; all 12 runs then 0.985-1.000)."""
    path = write_phantoms(tmp_path / "eight.h5", n=14, size=64, patients=14, seed=3)
    cfg = SegTrainConfig(size=64, base_channels=8, depth=3, batch_size=4, epochs=40, patience=None, loss="bce+dice",
                         lr=1e-2, hflip=False, max_rotation=0.0, plot_samples=2, bn_stat_slices=64)
    result = train_segmenter(cfg, path, tmp_path / "run")
    train = PreparedDataset(path, split="train")
    assert len(train) == 8
    images = np.stack([train[i]["image"].numpy() for i in range(8)])
    truth = np.stack([train[i]["mask"][0].numpy() for i in range(8)]) > 0.5
    pred = Segmenter(result.model, device="cpu").predict(images) >= 0.5  # the trained state, in eval mode
    assert dice_iou(pred, truth)[0].mean() > 0.9
    rows = CsvLog(tmp_path / "run" / "log.csv").rows()
    assert [int(r["epoch"]) for r in rows] == list(range(1, 41))
    assert float(rows[-1]["train_loss"]) < 0.4 * float(rows[0]["train_loss"])
    for name in ("loss.png", "dice_iou.png", "samples_train.png", "samples_val.png", "samples_test.png"):
        assert (tmp_path / "run" / "plots" / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"dice", "iou", "per_class", "hd95", "fp_rate"} <= set(metrics["test"])


def test_early_stopping_and_best_model(data, tmp_path):
    cfg = SegTrainConfig(**{**TINY, "epochs": 30, "patience": 2, "lr": 1e-6})  # lr so small nothing improves
    result = train_segmenter(cfg, data, tmp_path / "run")
    assert result.metrics["epochs_run"] < 30
    assert result.metrics["epochs_run"] - result.metrics["best_epoch"] == 2
    assert (tmp_path / "run" / "model" / "diffusion_pytorch_model.safetensors").exists()


def test_kill_then_resume_reaches_the_same_epoch_count(data, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "genseg", "train-seg", "--data", str(data), "--out", str(run), "--size", "32",
            "--epochs", "10", "--batch-size", "2", "--seed", "1", "--config", str(tmp_path / "c.yaml")]
    (tmp_path / "c.yaml").write_text("base_channels: 4\ndepth: 2\npatience: null\nplot_samples: 1\n")
    kill_after_first_checkpoint(args, run)
    done = json.loads(sorted((run / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json").read_text())
    assert 1 <= done["epoch"] < 10, "the kill should land mid-run"
    out = subprocess.run(args + ["--resume"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [int(r["epoch"]) for r in CsvLog(run / "log.csv").rows()] == list(range(1, 11))
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert json.loads((last / "trainer_state.json").read_text())["epoch"] == 10
    assert "precision: no" in out.stdout and (run / "metrics.json").exists()


def test_resume_without_checkpoint_is_a_clean_error(data, tmp_path, genseg_cli):
    out = genseg_cli("train-seg", "--data", data, "--out", tmp_path / "none", "--size", "32", "--resume", returncode=2)
    assert "nothing to resume" in out.stderr and "Traceback" not in out.stderr


def test_resume_refuses_changed_settings(data, tmp_path):
    train_segmenter(SegTrainConfig(**TINY), data, tmp_path / "run")
    with pytest.raises(ConfigError, match="changed settings \\['lr'\\]"):
        train_segmenter(SegTrainConfig(**{**TINY, "lr": 0.5}), data, tmp_path / "run", resume=True)
    with pytest.raises(ConfigError, match="already holds a training run"):
        train_segmenter(SegTrainConfig(**TINY), data, tmp_path / "run")


TWO_PROCESS_SCRIPT = """
import sys
from safetensors.torch import save_file
from genseg.runs import SegTrainConfig
from genseg.training.seg import train_segmenter
import torch.distributed as dist
cfg = SegTrainConfig(size=32, base_channels=4, depth=2, batch_size=2, epochs=1, patience=None, plot_samples=1)
result = train_segmenter(cfg, sys.argv[1], sys.argv[2], cpu=True)
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
          f"{sys.argv[2]}/rank{dist.get_rank()}.safetensors")
"""


def test_two_cpu_processes_train_one_epoch_and_agree(data, tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(data), str(run)], env=cli_env(), capture_output=True, text=True,
                         timeout=300)
    errors = [line for line in out.stderr.splitlines() if "Error" in line or "[rank1]" in line]
    assert out.returncode == 0, "\n".join(errors[-40:]) + "\n...\n" + out.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["processes"] == 2
    rank0, rank1 = load_file(run / "rank0.safetensors"), load_file(run / "rank1.safetensors")
    saved = load_file(run / "model" / "diffusion_pytorch_model.safetensors")
    trained = [k for k in rank0 if "running" not in k and "num_batches" not in k]  # BN statistics stay per process
    assert all(np.array_equal(rank0[k].numpy(), rank1[k].numpy()) for k in trained)
    assert all(np.array_equal(rank0[k].numpy(), saved[k].numpy()) for k in trained)
    row = CsvLog(run / "log.csv").rows()[0]
    # each process takes half of the 24 training slices in batches of 2: 6 optimizer steps, all 24 slices seen
    assert (int(row["step"]), int(row["real_seen"])) == (6, 24)


@pytest.mark.parametrize("ratio,real,synthetic", [(0.0, 24, 0), (1.0, 0, 12), (0.5, 12, 12)])
def test_synthetic_ratio_counts(data, tmp_path, ratio, real, synthetic):
    synth = write_synthetic(tmp_path / "synth.h5", n=12, size=32)
    cfg = SegTrainConfig(**{**TINY, "synthetic_ratio": ratio})
    train_segmenter(cfg, data, tmp_path / "run", synthetic=synth)
    row = CsvLog(tmp_path / "run" / "log.csv").rows()[0]
    assert (int(row["real_seen"]), int(row["synthetic_seen"])) == (real, synthetic)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["synthetic"]["metadata"]["model"] == "test-ddpm"
    assert info["epoch"] == {"length": real + synthetic, "real": real, "synthetic": synthetic,
                             "synthetic_ratio": ratio, "real_fraction": 1.0}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["num_slices"] == 8  # real only


def test_mix_sampler_epochs():
    sampler = MixSampler(num_real=10, num_synthetic=3, ratio=0.5, seed=0)
    first = list(sampler)
    assert len(first) == 10 and sum(i >= 10 for i in first) == 5
    assert len(set(i for i in first if i < 10)) == 5  # real slices without repetition
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_real_fraction_keeps_whole_patients(data, tmp_path):
    patients = np.array(["a", "a", "b", "c", "c", "d"])
    keep = subsample_patients(patients, 0.5, seed=0)
    assert keep.sum() in (3, 4) and set(patients[keep]).isdisjoint(patients[~keep])
    train_segmenter(SegTrainConfig(**{**TINY, "real_fraction": 0.5}), data, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["real_train_patients"], info["real_train_slices"]) == (3, 12)  # of 6 patients, 24 slices


def test_quality_filters_select_synthetic_slices(data, tmp_path):
    synth = write_synthetic(tmp_path / "synth.h5", n=12, size=32)  # agreement 0..1, nn ratio NaN, then ..2
    cfg = SegTrainConfig(**{**TINY, "synthetic_ratio": 1.0, "min_agreement": 0.5, "min_nn_ratio": 1.0})
    train_segmenter(cfg, data, tmp_path / "run", synthetic=synth)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["synthetic"]["num_kept"] == 6


def test_bad_mixing_settings(data, tmp_path):
    with pytest.raises(ConfigError, match="synthetic_ratio must be in \\[0, 1\\]"):
        SegTrainConfig(synthetic_ratio=1.5)
    with pytest.raises(ConfigError, match="needs a synthetic file"):
        train_segmenter(SegTrainConfig(**{**TINY, "synthetic_ratio": 0.5}), data, tmp_path / "a")
    wrong_size = write_synthetic(tmp_path / "s64.h5", n=4, size=64)
    with pytest.raises(DataError, match="s64.h5: synthetic images are 64x64"):
        train_segmenter(SegTrainConfig(**{**TINY, "synthetic_ratio": 0.5}), data, tmp_path / "b", synthetic=wrong_size)
    with pytest.raises(DataError, match="not marked synthetic"):
        train_segmenter(SegTrainConfig(**{**TINY, "synthetic_ratio": 0.5}), data, tmp_path / "c", synthetic=data)
    no_quality = write_synthetic(tmp_path / "nq.h5", n=4, size=32, quality=False)
    with pytest.raises(DataError, match="no `quality_agreement` dataset"):
        train_segmenter(SegTrainConfig(**{**TINY, "synthetic_ratio": 0.5, "min_agreement": 0.5}), data,
                        tmp_path / "d", synthetic=no_quality)
    with pytest.raises(ConfigError, match="size 64 does not match"):
        train_segmenter(SegTrainConfig(**{**TINY, "size": 64}), data, tmp_path / "e")


def test_synthetic_ratio_cli_error(data, tmp_path, genseg_cli):
    out = genseg_cli("train-seg", "--data", data, "--size", "32", "--out", tmp_path, "--synthetic-ratio", "2",
                     returncode=2)
    assert "synthetic_ratio must be in [0, 1]" in out.stderr and "Traceback" not in out.stderr


def test_cross_validate_two_folds_and_reuse(data, tmp_path):
    summary = cross_validate(SegTrainConfig(**TINY), data, tmp_path / "cv", folds=[1, 2])
    assert summary["folds"] == [1, 2] and len(summary["dice"]["values"]) == 2
    assert "± " in summary["table"] and (tmp_path / "cv" / "cv.md").exists()
    fold_run = json.loads((tmp_path / "cv" / "fold-2" / "metrics.json").read_text())
    assert fold_run["test"]["selection"] == {"folds": [2]} and fold_run["val"]["selection"] == {"folds": [3]}
    mtime = (tmp_path / "cv" / "fold-1" / "metrics.json").stat().st_mtime
    again = cross_validate(SegTrainConfig(**TINY), data, tmp_path / "cv", folds=[1, 2])
    assert again["dice"] == summary["dice"]
    assert (tmp_path / "cv" / "fold-1" / "metrics.json").stat().st_mtime == mtime  # finished folds are reused


def test_evaluate_cli_json(data, tmp_path, genseg_cli):
    train_segmenter(SegTrainConfig(**TINY), data, tmp_path / "run")
    out = genseg_cli("evaluate", "--checkpoint", tmp_path / "run", "--data", data, "--fold", "4", "--json")
    result = json.loads(out.stdout)
    assert {"dice", "iou", "per_class", "hd95", "per_patient_dice", "fp_rate"} <= set(result)
    assert result["selection"] == {"folds": [4]} and result["num_slices"] == 8


def test_evaluate_names_classes_as_the_data_does(data, tmp_path):
    """Per-class scores carry the names `prepare` recorded (BUSI's benign / malignant / normal), not Figshare's."""
    train_segmenter(SegTrainConfig(**TINY), data, tmp_path / "run")
    names = {"0": "normal", "1": "benign", "2": "malignant", "3": "other"}
    busi = write_phantoms(tmp_path / "busi.h5", n=40, size=32, patients=10, metadata={"class_names": names})
    assert set(evaluate(tmp_path / "run", busi, progress=False)["per_class"]) == set(names.values())
    assert set(evaluate(tmp_path / "run", data, progress=False)["per_class"]) == {"none", "meningioma", "glioma",
                                                                                   "pituitary"}


def test_evaluate_rejects_missing_or_foreign_checkpoint(data, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        evaluate(tmp_path / "nope", data)


def test_gradient_checkpointing_trains_the_same_weights(data, tmp_path):
    """The memory-saving switch changes how the backward pass is computed, not what it computes."""
    runs = {flag: train_segmenter(SegTrainConfig(**{**TINY, "epochs": 2, "gradient_checkpointing": flag}), data,
                                  tmp_path / f"run-{flag}") for flag in (False, True)}
    plain, checkpointed = (load_file(tmp_path / f"run-{flag}" / "model" / "diffusion_pytorch_model.safetensors")
                           for flag in (False, True))
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        assert torch.allclose(plain[key], checkpointed[key], atol=1e-6), key
    assert "gradient_checkpointing: true" in (tmp_path / "run-True" / "config.yaml").read_text()
    assert runs[True].metrics["test"]["dice"] == pytest.approx(runs[False].metrics["test"]["dice"], abs=1e-6)
    resumed = train_segmenter(SegTrainConfig(**{**TINY, "epochs": 3, "gradient_checkpointing": True}), data,
                              tmp_path / "run-False", resume=True)  # may change on resume: it changes no result
    assert resumed.metrics["epochs_run"] == 3


def test_weight_average_is_what_is_validated_and_saved(data, tmp_path):
    """With ema_decay the saved best model holds the averaged weights (the checkpoint's EMA), not the weights of
    the last step."""
    cfg = SegTrainConfig(**{**TINY, "epochs": 1, "ema_decay": 0.9})
    result = train_segmenter(cfg, data, tmp_path / "run")
    saved = load_file(tmp_path / "run" / "model" / "diffusion_pytorch_model.safetensors")
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    shadow = load_file(checkpoint / "ema.safetensors")
    names = [name for name, _ in result.model.named_parameters()]
    assert len(names) == len([k for k in shadow if k.startswith("shadow_params.")])
    live = dict(result.model.named_parameters())
    moved = 0
    for i, name in enumerate(names):
        assert torch.equal(saved[name], shadow[f"shadow_params.{i}"]), name
        moved += not torch.allclose(saved[name], live[name].detach())
    assert moved > len(names) // 2, "the average differs from the last step's weights"
    row = CsvLog(tmp_path / "run" / "log.csv").rows()[-1]
    assert float(row["val_dice"]) == pytest.approx(result.metrics[f"best_val_{cfg.monitor}"])


def test_weight_average_resumes_where_it_stopped(data, tmp_path):
    """A resumed run continues the same average: two epochs straight and one plus one resumed save equal models."""
    settings = {**TINY, "ema_decay": 0.8, "bn_stat_slices": 8}
    train_segmenter(SegTrainConfig(**{**settings, "epochs": 2}), data, tmp_path / "whole")
    train_segmenter(SegTrainConfig(**{**settings, "epochs": 1}), data, tmp_path / "cut")
    train_segmenter(SegTrainConfig(**{**settings, "epochs": 2}), data, tmp_path / "cut", resume=True)
    whole, cut = (load_file(tmp_path / run / "model" / "diffusion_pytorch_model.safetensors") for run in ("whole", "cut"))
    assert whole.keys() == cut.keys()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
