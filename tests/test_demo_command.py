"""`genseg demo` in its tiny CI mode (same stages, seconds instead of minutes), its reuse of finished stages and
its errors; scripts/train_demo_checkpoints.py and scripts/study_synthetic_ratio.py in their tiny modes.

The generator is a 32 px diffusers UNet trained two steps, saved as a GenSegPipeline folder: the demo's contract
(stages, files, counts, reuse) does not depend on what the weights learned. In-process calls (click's runner,
the scripts' main()) because every fresh interpreter costs 15-20 s of imports here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from genseg.cli import main
from genseg.data.prepared import read_metadata
from genseg.pipeline.diffusion import seed_generators
from genseg.pipeline.genseg_pipeline import GenSegPipeline
from diffusion_helpers import quiet, tiny_pipeline as make_tiny_pipeline
from seg_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny"), {"sample_size": SIZE, "block_out_channels": [8, 16],
                              "norm_num_groups": 4}, base_channels=4, depth=2, max_steps=2, checkpoint_every_steps=2)


def demo(*args):
    return CliRunner().invoke(main, ["demo", *map(str, args)])


def test_demo_runs_end_to_end_and_reuses_finished_stages(tiny_pipeline, tmp_path):
    out = tmp_path / "demo"
    done = demo("--out", out, "--pipeline", tiny_pipeline, "--tiny")
    assert done.exit_code == 0, done.output
    assert "plan (expected seconds" in done.output and "total" in done.output
    for name in ("report.md", "comparison.png", "synthetic_grid.png", "synthetic_quality.png", "quality.json",
                 "pipeline/contact_sheet.png", "pipeline/summary.json", "seg-real/metrics.json",
                 "seg-mixed/metrics.json"):
        assert (out / name).is_file(), name
    # as many synthetic slices as the real training split, at the generator's size
    real = read_metadata(out / "demo.h5")
    n_train = int((real["split"] == "train").sum())
    synthetic = read_metadata(out / "synthetic.h5")
    assert synthetic["num_slices"] == n_train and int(real["attrs"]["size"]) == SIZE
    with h5py.File(out / "synthetic.h5") as h5:
        assert "quality_agreement" in h5  # evaluated with the real-only segmenter
    # the mixed run really trained on synthetic slices, the real-only one did not
    mixed_info = json.loads((out / "seg-mixed" / "run.json").read_text())
    assert mixed_info["epoch"]["synthetic"] == round(0.5 * n_train) and mixed_info["synthetic"]["num_slices"] == n_train
    assert json.loads((out / "seg-real" / "run.json").read_text())["epoch"]["synthetic"] == 0
    # the report's table holds the runs' own test scores
    report = (out / "report.md").read_text()
    for name, run in (("real-only", "seg-real"), ("mixed", "seg-mixed")):
        test = json.loads((out / run / "metrics.json").read_text())["test"]
        assert f"| {name} | {test['dice']:.4f} | {test['iou']:.4f} |" in report
    assert "pipeline/contact_sheet.png" in report and "synthetic_grid.png" in report
    assert json.loads((out / "pipeline" / "summary.json").read_text())["num_slices"] == 4

    model_file = next((out / "seg-real" / "model").glob("*.safetensors"))
    stamp = model_file.stat().st_mtime_ns
    again = demo("--out", out, "--pipeline", tiny_pipeline, "--tiny")
    assert again.exit_code == 0, again.output
    stages = ["data", "prepare", "generator", "sample", "seg-real", "quality", "seg-mixed", "pipeline", "report"]
    assert all(f"[{s}] reused" in again.output for s in stages), again.output
    # the plan times only the stages that will run: none here, so nothing is above any budget
    assert all(f"  {s:<10} reused" in again.output for s in stages) and "total      ~     0 s" in again.output
    assert "above the" not in again.output and "(expected ~" not in again.output
    assert model_file.stat().st_mtime_ns == stamp

    # a damaged stage is redone, and so is everything after it; earlier stages stay
    (out / "quality.json").unlink()
    third = demo("--out", out, "--pipeline", tiny_pipeline, "--tiny")
    assert third.exit_code == 0, third.output
    assert "[seg-real] reused" in third.output and "[quality] done" in third.output
    assert "[seg-mixed] done" in third.output and "[report] done" in third.output
    assert "  seg-real   reused" in third.output and "  quality    ~" in third.output
    times = (out / "report.md").read_text().split("## Time")[1]
    assert "| seg-real | reused |" in times and "| quality | reused |" not in times


def test_demo_errors(tiny_pipeline, tmp_path, monkeypatch):
    import genseg.workflows.pipeline_run as pipeline_run

    monkeypatch.setattr(pipeline_run, "DEMO_PIPELINE", tmp_path / "not-shipped")
    done = demo("--out", tmp_path / "a", "--tiny")
    assert done.exit_code == 2
    assert "no shipped demo generator" in done.output and "--pipeline" in done.output and "--from-scratch" in done.output
    done = demo("--out", tmp_path / "b", "--pipeline", tmp_path, "--tiny")
    assert done.exit_code == 2 and "model_index.json" in done.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    done = demo("--out", foreign, "--pipeline", tiny_pipeline, "--tiny", "--force")
    assert done.exit_code == 2 and "no `genseg demo` wrote" in done.output
    assert (foreign / "notes.txt").read_text() == "keep"
    done = demo("--out", tmp_path / "c", "--pipeline", tiny_pipeline, "--from-scratch", "--tiny")
    assert done.exit_code == 2 and "not both" in done.output
    # --force on a previous demo folder (it has stages.json) replaces everything in it and redoes every stage
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "stages.json").write_text("{}")
    (previous / "old.txt").write_text("stale")
    done = demo("--out", previous, "--pipeline", tiny_pipeline, "--tiny", "--force")
    assert done.exit_code == 0, done.output
    assert not (previous / "old.txt").exists() and "reused" not in done.output and (previous / "report.md").is_file()


def test_train_demo_checkpoints_tiny(tmp_path):
    """Every stage at 64 px with the real configs (2 generator steps, 1 epoch), the OUT files, reuse of finished
    stages, resuming a generator below --diffusion-steps, and the fp16 fallback above --max-mb."""
    script = load_script("train_demo_checkpoints")
    work, out = tmp_path / "work", tmp_path / "out"
    numbers = script.main(["--work", str(work), "--out", str(out), "--tiny"])
    for name in ("pipeline/model_index.json", "log.csv", "samples-step-00000002.png", "synthetic_grid.png",
                 "quality.json", "synthetic_quality.png", "README.md"):
        assert (out / name).is_file(), name
    assert numbers["diffusion_steps"] == 2 and numbers["pipeline_precision"] == "fp32"
    assert numbers["pipeline_mb"] == pytest.approx(script.folder_mb(out / "pipeline"), abs=0.01)
    assert numbers["pipeline_mb"] <= 30
    readme = (out / "README.md").read_text()
    assert f"Dice {numbers['seg_test']['dice']:.4f}" in readme and "Tiny test build" in readme
    assert "10 patients x 2 slices" in readme and str(work) not in readme
    pipe = GenSegPipeline.load(out / "pipeline")
    assert pipe.unet.config.sample_size == 64 and pipe.segmenter.config.base_channels == 16

    seg_model = next((work / "seg" / "model").glob("*.safetensors"))
    stamp = seg_model.stat().st_mtime_ns
    numbers = script.main(["--work", str(work), "--out", str(out), "--tiny", "--diffusion-steps", "3",
                           "--max-mb", "1"])
    assert numbers["diffusion_steps"] == 3  # resumed from step 2, not restarted
    assert seg_model.stat().st_mtime_ns == stamp  # finished segmenter reused
    assert numbers["pipeline_precision"] == "fp16" and numbers["pipeline_mb"] < 15
    result = quiet(GenSegPipeline.load(out / "pipeline"))(2, num_inference_steps=2, generator=seed_generators(0, 2))
    assert result.images.shape == (2, 64, 64) and np.isfinite(result.probabilities).all()


@pytest.mark.parametrize("change", ["agreement", "more"])
def test_study_smoke(tiny_pipeline, tmp_path, change):
    """The study's grid (2 fractions x 2 ratios, synthetic-only, one change) on tiny data: tables, JSON, plot."""
    script = load_script("study_synthetic_ratio")
    out = tmp_path / "study"
    summary = script.main(["--smoke", "--pipeline", str(tiny_pipeline), "--out", str(out), "--change", change])
    runs = summary["runs"]
    baseline = [r for r in runs if r["arm"] == "baseline"]
    assert len(baseline) == 2 * 2 + 1 and len(runs) == len(baseline) + 2 + 1  # change: ratio 0.5 x 2 + synth-only
    for name in ("study.md", "study.json", "study.png", "synthetic_grid.png"):
        assert (out / name).is_file(), name
    table = (out / "study.md").read_text()
    assert "### Test Dice" in table and "### Test IoU" in table and "Synthetic only (ratio 1" in table
    for r in baseline:  # every cell's number is its run's own test score, and the mix is what was asked
        run = out / "runs" / "baseline" / f"f{r['fraction']:g}-r{r['ratio']:g}-s0"
        assert json.loads((run / "metrics.json").read_text())["test"]["dice"] == r["dice"]
        assert r["epoch"]["synthetic"] == round(r["ratio"] * r["epoch"]["length"])
    real_only = next(r for r in baseline if r["fraction"] == 0.5 and r["ratio"] == 0)
    assert real_only["real_slices"] < next(r["real_slices"] for r in baseline if r["fraction"] == 1.0)
    assert real_only["epochs"] > 1  # equal steps: half the real slices, twice the epochs
    changed = [r for r in runs if r["arm"] != "baseline"]
    if change == "more":
        mixed = next(r for r in baseline if r["ratio"] > 0)
        assert all(r["synthetic_kept"] == 2 * mixed["synthetic_kept"] > 0 for r in changed)
    else:
        assert (out / "synthetic-agreement" / "f0.5-r0-s0.h5").is_file()
    if change == "agreement":  # once is enough: finished runs and files are reused
        again = script.main(["--smoke", "--pipeline", str(tiny_pipeline), "--out", str(out), "--change", change])
        assert [r.get("dice") for r in again["runs"]] == [r.get("dice") for r in runs]


def test_demo_from_scratch_states_the_training_time_first(tmp_path):
    """--from-scratch: the measured s/step x steps is printed before anything trains; the demo then samples from
    the generator it trained (tiny: a 32 px UNet, 2 steps)."""
    from genseg.workflows.demo import run_demo

    lines = []
    summary = run_demo(tmp_path / "demo", from_scratch=True, diffusion_steps=2, tiny=True, echo=lines.append)
    announce = next(i for i, line in enumerate(lines) if line.startswith("--from-scratch: training the generator"))
    assert "s/step x 2 steps" in lines[announce]
    assert announce < next(i for i, line in enumerate(lines) if line.startswith("[data]"))
    run = tmp_path / "demo" / "diffusion"
    assert summary["generator"] == str(run) and (run / "checkpoints" / "step-00000002").is_dir()
    assert read_metadata(tmp_path / "demo" / "synthetic.h5")["attrs"]["metadata"]["model"] == str(run.resolve())
    assert (tmp_path / "demo" / "report.md").is_file()


def test_study_segmenters_make_equal_steps(tiny_pipeline, tmp_path):
    """seg_overrides replace the segmenter config's keys, null included: time_budget null and max_steps N give
    every run exactly N optimizer steps (not equal wall time, in which slower steps make fewer), and the table says
    so; --synthetic-ratios runs a subset of the ratios."""
    import yaml

    script = load_script("study_synthetic_ratio")
    config = tmp_path / "study.yaml"
    smoke = dict(script.SMOKE, synthetic_only=False, change="none")
    smoke["seg_overrides"] = {**smoke["seg_overrides"], "epochs": None, "time_budget": None, "max_steps": 3}
    config.write_text(yaml.safe_dump(smoke))
    out = tmp_path / "study"
    summary = script.main(["--config", str(config), "--pipeline", str(tiny_pipeline), "--out", str(out),
                           "--synthetic-ratios", "0"])
    assert [(r["fraction"], r["ratio"]) for r in summary["runs"]] == [(0.5, 0.0), (1.0, 0.0)]
    assert [r["steps"] for r in summary["runs"]] == [3, 3]
    assert "segmenters stop at 3 steps;" in summary["table"]
    run_config = yaml.safe_load((out / "runs" / "baseline" / "f0.5-r0-s0" / "config.yaml").read_text())
    assert run_config["time_budget"] is None and run_config["max_steps"] == 3


def test_study_matched_generator_arms(tiny_pipeline, tmp_path):
    """The fairness arms: per mode a generator per (fraction < 1, seed) trained on exactly that segmenter's real
    patients, its synthetic set used for the 0 < ratio < 1 cells of that fraction only; the mask-conditioned and
    inpaint sets drawn from those patients' slices alone; the augmented-real control beside them; every set's
    quality measured by the real-only run of its seed."""
    script = load_script("study_synthetic_ratio")
    out = tmp_path / "study"
    summary = script.main(["--smoke", "--pipeline", str(tiny_pipeline), "--out", str(out), "--change", "none",
                           "--matched-generator", "--matched-modes", "joint,mask-conditioned,inpaint",
                           "--augmented-real"])
    runs = summary["runs"]
    kept = read_metadata(out / "kept" / "f0.5-s0.h5")
    real = read_metadata(out / "demo.h5")
    real_only = json.loads((out / "runs" / "baseline" / "f0.5-r0-s0" / "run.json").read_text())
    assert sorted(set(kept["patients"])) == real_only["kept_patients"] and set(kept["split"]) == {"train"}
    for mode in ("joint", "mask-conditioned", "inpaint"):
        matched = [r for r in runs if r["arm"] == f"matched {mode}"]
        assert [(r["fraction"], r["ratio"]) for r in matched] == [(0.5, 0.5)]
        generator = json.loads((out / "generators" / mode / "f0.5-s0" / "run.json").read_text())
        segmenter = json.loads((out / "runs" / f"matched-{mode}" / "f0.5-r0.5-s0" / "run.json").read_text())
        assert generator["kept_patients"] == segmenter["kept_patients"] == real_only["kept_patients"]
        path = out / "synthetic-matched" / mode / "f0.5-s0.h5"
        assert segmenter["synthetic"]["path"] == str(path.resolve())
        assert matched[0]["quality"]["kid_mean"] is not None and path.with_suffix(".png").is_file()
        metadata = read_metadata(path)["attrs"]["metadata"]
        if mode == "mask-conditioned":  # masks of the kept patients only
            assert metadata["masks_from"] == str((out / "kept" / "f0.5-s0.h5").resolve())
        if mode == "inpaint":  # hosts and lesions are the kept patients' slices
            assert metadata["inpaint_into"] == str((out / "kept" / "f0.5-s0.h5").resolve())
        assert f"| matched {mode} | 50 % " in summary["table"] and f"| matched {mode} | 100 % " not in summary["table"]
    augmented = read_metadata(out / "augmented-real" / "f0.5-s0.h5")
    sources = {int(s.split()[1]) for s in augmented["sources"]}
    assert sources <= {i for i, p in enumerate(real["patients"]) if p in set(kept["patients"])}
    assert augmented["num_slices"] == summary["real_train_slices"]
    assert "matched inpaint against augmented real, real fraction 50 %, ratio 0.5" in summary["table"]
    assert "### The synthetic sets" in summary["table"] and "lesion windows: KID x 1000" in summary["table"]
    assert all("lesion_kid_mean" in r["quality"] for r in runs if r.get("quality"))
    assert "| kept real slices, unchanged | 50 % | 1 |" in summary["table"]  # the matched sets' own reference
    reference = out / "kept-real" / "f0.5-s0.h5"
    with h5py.File(reference, "r") as h5, h5py.File(out / "demo.h5", "r") as demo:
        rows = read_metadata(reference)["attrs"]["metadata"]["rows"]
        assert len(set(rows)) == len(rows) == kept["num_slices"]  # every kept slice once, unmoved
        np.testing.assert_array_equal(h5["images"][:], demo["images"][sorted(rows)][np.argsort(np.argsort(rows))])
    judged = script.main(["--smoke", "--pipeline", str(tiny_pipeline), "--out", str(out), "--change", "none",
                          "--matched-generator", "--matched-modes", "joint,mask-conditioned,inpaint",
                          "--augmented-real", "--quality-judge", str(tiny_pipeline)])  # another judge, runs reused
    assert [r["dice"] for r in judged["runs"]] == [r["dice"] for r in runs]
    assert {r["quality"]["judge"] for r in judged["runs"] if "quality" in r} == {str(tiny_pipeline)}
    assert (out / "synthetic-matched" / "inpaint" / f"f0.5-s0.quality-{tiny_pipeline.name}.json").is_file()
    part = script.main(["--smoke", "--pipeline", str(tiny_pipeline), "--out", str(out), "--change", "none",
                        "--matched-generator", "--matched-modes", "joint", "--no-augmented-real",
                        "--real-fractions", "0.5"])  # one part of the study: its cells only, runs reused
    assert {(r["arm"], r["fraction"]) for r in part["runs"] if r["ratio"] < 1} == \
        {("baseline", 0.5), ("matched joint", 0.5)}  # (1, 1) is the synthetic-only cell, in every part
    dice = {(r["arm"], r["fraction"], r["ratio"]): r["dice"] for r in runs}
    assert all(dice[r["arm"], r["fraction"], r["ratio"]] == r["dice"] for r in part["runs"])
    assert "augmented real" not in part["table"] and "| 100 % " not in part["table"]
    assert "| matched joint | 50 % | 1 |" in part["table"]  # its set's quality row, without the note on inpainting
    assert "The inpaint sets'" in summary["table"] and "The inpaint sets'" not in part["table"]


def test_other_load_counts_the_cores_other_processes_take():
    import subprocess
    import time

    from genseg.workflows.demo import OtherLoad

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        with OtherLoad() as busy:
            time.sleep(1.5)
    finally:
        child.kill()
        child.wait()
    assert busy.cores > 0.5


def test_the_plan_says_when_it_timed_on_a_busy_machine(tiny_pipeline, tmp_path, monkeypatch):
    import itertools

    import genseg.workflows.demo as demo_module

    ticks = itertools.count(0, 1000.0)  # every reading: another 1000 busy CPU seconds
    monkeypatch.setattr(demo_module, "_busy_cpu_seconds", lambda: next(ticks))
    done = demo("--out", tmp_path / "demo", "--pipeline", tiny_pipeline, "--tiny")
    assert done.exit_code == 0, done.output
    assert "note: other processes kept" in done.output and "while the models were timed" in done.output
