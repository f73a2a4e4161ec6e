"""train-seg's recipe (issue 14): time-budgeted training with a learning-rate schedule that runs to the end of the
budget and continues on --resume after a kill, and the bad settings it refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from seg_helpers import cli_env, kill_after_first_checkpoint, one_torch_thread, write_phantoms  # noqa: F401 (autouse fixture)

from genseg.config import load_config
from genseg.data.augment import PairedAugment
from genseg.errors import ConfigError
from genseg.runs import CsvLog, SegTrainConfig
from genseg.training.mixing import MixSampler
from genseg.training.schedule import POLY_POWER
from genseg.training.seg import train_segmenter

TINY = dict(size=32, base_channels=4, depth=2, batch_size=4, epochs=None, patience=None, hflip=False,
            max_rotation=0.0, plot_samples=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("recipe") / "real.h5", n=40, size=32, patients=10)


def lrs(run: Path) -> list[float]:
    return [float(r["lr"]) for r in CsvLog(run / "log.csv").rows()]


def weights(run: Path) -> dict:
    return load_file(run / "model" / "diffusion_pytorch_model.safetensors")


def test_time_budget_ends_the_run_with_the_schedule_at_its_end(data, tmp_path):
    cfg = SegTrainConfig(**TINY, time_budget=0.1, lr_schedule="cosine", warmup_steps=4)
    result = train_segmenter(cfg, data, tmp_path / "run")
    seconds = result.metrics["train_seconds"]
    assert 6.0 <= seconds < 6.0 + 10, "the budget (validation included) ends the run, a last validation over it"
    rates = lrs(tmp_path / "run")
    assert rates[-1] < 1e-3 * 1e-2, "cosine reaches ~0 when the budget ends"
    assert all(b <= a + 1e-12 for a, b in zip(rates, rates[1:])), "cosine decays monotonically after warm-up"
    assert result.metrics["epochs_run"] > 3 and (tmp_path / "run" / "model").is_dir()


def test_max_steps_schedule_resumes_bit_for_bit_after_a_kill(data, tmp_path):
    """Without a time budget the schedule is a function of the step: a killed and resumed run is the same run."""
    (tmp_path / "c.yaml").write_text("base_channels: 4\ndepth: 2\nepochs: null\npatience: null\nplot_samples: 1\n"
                                     "lr_schedule: polynomial\nwarmup_steps: 5\n" + "".join(f"{k}: {v}\n" for k, v in EVERY_PART.items()))

    def args(run: Path) -> list[str]:
        return [sys.executable, "-m", "genseg", "train-seg", "--data", str(data), "--out", str(run), "--size", "32",
                "--max-steps", "126", "--batch-size", "2", "--seed", "1", "--config", str(tmp_path / "c.yaml")]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(args(whole), env=cli_env(), check=True, capture_output=True, timeout=300)
    kill_after_first_checkpoint(args(cut), cut)
    done = json.loads(sorted((cut / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json").read_text())
    assert 1 <= done["epoch"] < 10, "the kill should land mid-run"
    out = subprocess.run(args(cut) + ["--resume"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in CsvLog(whole / "log.csv").rows()]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in CsvLog(cut / "log.csv").rows()] == rows
    assert [int(r["step"]) for r in rows] == [*range(12, 121, 12), 126]  # the last, short epoch is validated too
    expected = [1e-3 * (1 - step / 126) ** POLY_POWER for step in range(12, 121, 12)]
    assert lrs(whole)[:10] == pytest.approx(expected, rel=5e-3)  # progress read in 1e-4 ticks
    a, b = weights(whole), weights(cut)
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_budgeted_run_resumes_on_its_clock_after_a_kill(data, tmp_path):
    """A kill loses the time since the last checkpoint, not the schedule: the resumed run picks up the
    checkpoint's elapsed time, so the learning rate goes on falling and the budget is spent once."""
    run = tmp_path / "run"
    (tmp_path / "c.yaml").write_text("base_channels: 4\ndepth: 2\nepochs: null\npatience: null\nplot_samples: 1\n"
                                     "lr_schedule: linear\n")
    args = [sys.executable, "-m", "genseg", "train-seg", "--data", str(data), "--out", str(run), "--size", "32",
            "--time-budget", "0.2", "--batch-size", "2", "--config", str(tmp_path / "c.yaml")]
    kill_after_first_checkpoint(args, run)
    state = json.loads(sorted((run / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json").read_text())
    assert state["elapsed_s"] < 12, "the kill should land mid-run"
    out = subprocess.run(args + ["--resume"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = CsvLog(run / "log.csv").rows()
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    seconds = [float(r["seconds"]) for r in rows]
    assert all(b > a for a, b in zip(seconds, seconds[1:])) and seconds[-1] < 12 + 10
    rates = lrs(run)
    assert all(b < a for a, b in zip(rates, rates[1:])) and rates[-1] < 1e-3 * 0.05
    for row in rows:  # linear: lr = lr0 x (1 - elapsed / budget), read when the row's epoch ended
        assert float(row["lr"]) == pytest.approx(1e-3 * max(0.0, 1 - float(row["seconds"]) / 12), abs=1e-3 * 0.03)
    # a row's seconds are read at its epoch's last step, and the budget may run out in the validation after it:
    # the last checkpoint holds the clock where the run stopped
    final = json.loads(sorted((run / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json").read_text())
    assert 12 <= final["elapsed_s"] < 12 + 10
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["num_slices"] == 8


def test_resume_with_a_longer_budget_trains_on(data, tmp_path):
    """A changed limit is allowed on --resume (documented in schedule.py): the rest of the schedule follows the
    new budget; a changed schedule is not."""
    short = train_segmenter(SegTrainConfig(**TINY, time_budget=0.03, lr_schedule="cosine"), data, tmp_path / "run")
    longer = train_segmenter(SegTrainConfig(**TINY, time_budget=0.08, lr_schedule="cosine"), data, tmp_path / "run",
                             resume=True)
    assert longer.metrics["epochs_run"] > short.metrics["epochs_run"]
    assert longer.metrics["train_seconds"] >= 0.08 * 60
    with pytest.raises(ConfigError, match="changed settings \\['lr_schedule'\\]"):
        train_segmenter(SegTrainConfig(**TINY, time_budget=0.08, lr_schedule="linear"), data, tmp_path / "run",
                        resume=True)


def test_a_budget_inside_the_first_epoch_still_saves_a_validated_model(data, tmp_path, capsys):
    result = train_segmenter(SegTrainConfig(**TINY, time_budget=1e-5), data, tmp_path / "run")
    assert result.metrics["epochs_run"] == 1 and result.metrics["steps_run"] < 6  # 24 slices in batches of 4
    assert "inside the first epoch" in capsys.readouterr().out
    assert (tmp_path / "run" / "model").is_dir() and (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.parametrize("key,value,message", [
    ("time_budget", 0, "time_budget must be a positive number of minutes"),
    ("time_budget", -2.0, "time_budget must be a positive number of minutes"),
    ("max_steps", 0, "max_steps must be positive"),
    ("warmup_steps", -1, "warmup_steps must be >= 0"),
    ("ema_decay", 1.0, r"ema_decay must be in \(0, 1\) \(or null for off\), got 1.0"),
    ("ema_decay", -0.5, r"ema_decay must be in \(0, 1\) \(or null for off\), got -0.5"),
])
def test_bad_limits(key, value, message):
    with pytest.raises(ConfigError, match=message):
        SegTrainConfig(**{**TINY, "time_budget": 1.0, key: value})


def test_no_limit_at_all_is_refused():
    with pytest.raises(ConfigError, match="nothing would end the run"):
        SegTrainConfig(**TINY)


@pytest.mark.parametrize("flag,value,message", [("--time-budget", "0", "time_budget must be a positive"),
                                                ("--time-budget", "-1", "time_budget must be a positive"),
                                                ("--max-steps", "0", "max_steps must be positive")])
def test_bad_limits_on_the_command_line(data, tmp_path, genseg_cli, flag, value, message):
    out = genseg_cli("train-seg", "--data", data, "--size", "32", "--out", tmp_path / "run", flag, value,
                     returncode=2)
    assert message in out.stderr and "Traceback" not in out.stderr


# --- augmentation ---------------------------------------------------------------------------------------------

EVERY_PART = dict(hflip=True, vflip=True, max_rotation=30.0, scale_range=0.3, elastic_alpha=40.0, brightness=0.25,
                  contrast=0.25, gamma=0.3, noise_std=0.1, blur_sigma=1.0, low_resolution=0.5)
OFF = dict(hflip=False, vflip=False, max_rotation=0.0, scale_range=0.0, elastic_alpha=0.0, brightness=0.0,
           contrast=0.0, gamma=0.0, noise_std=0.0, blur_sigma=0.0, low_resolution=0.0)


def slice_pair(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    mask = (((yy - 0.2) / 0.3) ** 2 + ((xx + 0.1) / 0.4) ** 2 < 1).float()[None]
    image = (0.3 + 0.2 * xx.abs() + 0.4 * mask[0])[None].clamp(0, 1)
    return image, mask


@pytest.mark.parametrize("part", sorted(EVERY_PART))
def test_each_part_changes_slices_and_keeps_masks_binary(part):
    """Switched on alone, a part changes the slice (in some of 60 draws, as its probability says), the image stays
    in [0, 1], and the mask stays binary: geometric parts move it nearest, intensity parts leave it alone."""
    augment = SegTrainConfig(**{**TINY, "time_budget": 1.0, **OFF, part: EVERY_PART[part]}).augmentation()
    image, mask = slice_pair()
    torch.manual_seed(0)
    changed = 0
    for _ in range(60):
        out_image, out_mask = augment(image.clone(), mask.clone())
        assert out_image.shape == image.shape and out_mask.shape == mask.shape
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        assert 0.0 <= float(out_image.min()) and float(out_image.max()) <= 1.0
        intensity_only = part in ("brightness", "contrast", "gamma", "noise_std", "blur_sigma", "low_resolution")
        if intensity_only:
            assert torch.equal(out_mask, mask)
        changed += not torch.equal(out_image, image)
    assert changed > 0


def test_every_part_together_is_seeded_and_keeps_masks_binary():
    augment = PairedAugment(**EVERY_PART)
    image, mask = slice_pair()

    def batch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        torch.manual_seed(seed)
        return [augment(image.clone(), mask.clone()) for _ in range(20)]

    first, again, other = batch(1), batch(1), batch(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} and m.dtype == torch.float32 for _, m in first)


def test_all_parts_off_is_the_identity_and_the_old_keys_still_work(tmp_path):
    image, mask = slice_pair()
    out = PairedAugment(**OFF)(image, mask)
    assert torch.equal(out[0], image) and torch.equal(out[1], mask)
    (tmp_path / "old.yaml").write_text("hflip: false\nmax_rotation: 0\n")  # a config from before issue 14
    cfg = load_config(SegTrainConfig, tmp_path / "old.yaml")
    out = cfg.augmentation()(image, mask)
    assert torch.equal(out[0], image) and torch.equal(out[1], mask)


def test_unknown_or_bad_augmentation_keys_are_named(tmp_path):
    (tmp_path / "typo.yaml").write_text("elastic: 20\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) \\['elastic'\\].*did you mean 'elastic_alpha'"):
        load_config(SegTrainConfig, tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="noise_std must be >= 0"):
        SegTrainConfig(noise_std=-0.1)
    with pytest.raises(ConfigError, match="scale_range must be below 1"):
        SegTrainConfig(scale_range=1.0)


# --- foreground-aware sampling --------------------------------------------------------------------------------


def test_foreground_fraction_sets_each_epochs_share_of_tumour_slices():
    tumour = np.array([True, True, True, False, False, False, False, False, False, False])  # 3 of 10
    sampler = MixSampler(10, 0, 0.0, seed=0, real_tumour=tumour, foreground_fraction=0.6)
    first = list(sampler)
    assert len(first) == 10 and sum(tumour[i] for i in first) == 6  # 6 tumour positions from 3 slices: cycled
    assert len({i for i in first if not tumour[i]}) == 4  # 4 tumour-free positions, none repeated
    assert list(sampler) == first  # a function of (seed, epoch): what resume and several processes rely on
    sampler.set_epoch(1)
    assert list(sampler) != first
    off = MixSampler(10, 0, 0.0, seed=0)
    assert sorted(off) == list(range(10))


def test_foreground_fraction_bad_values(data, tmp_path):
    with pytest.raises(ConfigError, match="foreground_fraction must be in \\[0, 1\\]"):
        SegTrainConfig(foreground_fraction=1.5)
    with pytest.raises(ConfigError, match="needs tumour-free training slices"):
        MixSampler(4, 0, 0.0, real_tumour=np.ones(4, bool), foreground_fraction=0.5)


def test_foreground_fraction_in_training(data, tmp_path):
    train_segmenter(SegTrainConfig(**{**TINY, "epochs": 1, "foreground_fraction": 1.0}), data, tmp_path / "run")
    epoch = json.loads((tmp_path / "run" / "run.json").read_text())["epoch"]
    assert epoch["foreground_fraction"] == 1.0 and epoch["real_with_tumour"] == epoch["real"] == 24
