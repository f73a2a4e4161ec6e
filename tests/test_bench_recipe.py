"""scripts/bench_recipe.py end to end at a tiny budget: every recipe trains, is scored by genseg.evaluation.metrics, and
lands in the JSON, the markdown table and the validation-curve figure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def bench(*args, returncode=0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_recipe.py"), *map(str, args)],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == returncode, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_three_recipes_on_a_tiny_dataset(tmp_path):
    out = tmp_path / "bench"
    bench("--budget", 0.03, "--datasets", "skull", "--patients", 5, "--size", 32, "--out", out)
    results = json.loads((out / "results.json").read_text())
    rows = results["datasets"]["skull"]
    assert list(rows) == ["bare", "monai", "genseg"]
    for recipe, row in rows.items():
        assert row["epochs"] > 0 and row["curve"], recipe
        assert row["wall_s"] >= 0.03 * 60 * 0.9, recipe  # each used its budget
        assert 0 <= row["test"]["dice"] <= 1 and set(row["test"]["per_class"]) <= {"meningioma", "glioma", "pituitary"}
        assert all(0 <= dice <= 1 for _, dice in row["curve"])
    assert rows["genseg"]["budget_by"] in ("time_budget", "epochs")
    table = (out / "results.md").read_text()
    assert table.count("| skull |") == 3 and "Dice / bare" in table
    assert all(f"{name} " in table for name in rows["genseg"]["test"]["per_class"])
    assert Image.open(out / "val_dice.png").size[0] > 300
    assert (out / "data" / "skull-5p-32px.h5").exists()  # cached for the next run

    rescored = bench("--rescore", out / "results.json", "--min-peak", 0.6, 1.0, "--min-component", 4).stdout
    row = next(line for line in rescored.splitlines() if line.startswith("| bench | skull | genseg |"))
    assert f"| {rows['genseg']['test']['dice']:.3f} |" in row  # the saved model scores as it did
    summary = [line for line in rescored.splitlines() if line.startswith("| min-")]
    assert [line.split("|")[1:4] for line in summary] == [
        [f" {rule} ", f" {split} ", " 1 "] for rule in ("min-peak 0.6", "min-peak 1", "min-component 4")
        for split in ("val", "test")]


def test_bad_arguments_are_refused(tmp_path):
    done = bench("--budget", 0, "--out", tmp_path, returncode=2)
    assert "--budget must be positive" in done.stderr
    done = bench("--datasets", "brats", "--out", tmp_path, returncode=2)
    assert "invalid choice: 'brats'" in done.stderr
    done = bench("--rescore", tmp_path / "results.json", "--min-peak", 1.5, returncode=2)
    assert "--min-peak must be probabilities in [0, 1], got [1.5]" in done.stderr


def test_combine_averages_runs_and_pairs_differences_within_a_file(tmp_path):
    def row(dice, meningioma):
        return {"test": {"dice": dice, "per_class": {"meningioma": {"dice": meningioma}}}}

    files = []
    for k, (bare, genseg) in enumerate([(0.90, 0.94), (0.80, 0.82), (None, 0.70)]):
        rows = {"genseg": row(genseg, genseg - 0.1)}
        if bare is not None:
            rows["bare"] = row(bare, bare)
        if k == 0:
            rows["genseg x"] = row(0.95, 0.9)
        files.append(tmp_path / f"seed{k}.json")
        files[-1].write_text(json.dumps({"datasets": {"bias": rows, "skull": {"bare": row(0.5, 0.5)}}}))
    table = bench("--combine", *files).stdout
    genseg = next(line for line in table.splitlines() if line.startswith("| bias | genseg |"))
    cells = [c.strip() for c in genseg.strip("|").split("|")]
    assert cells[2:6] == ["3", "0.820", "0.120", "0.700"]  # runs, mean, sd, worst
    assert cells[6] == "+0.030 (0.014, n=2)"  # (0.04 + 0.02) / 2, only the files with both recipes
    assert cells[7] == "n/a" and cells[8] == "meningioma 0.720"
    bare = next(line for line in table.splitlines() if line.startswith("| bias | bare |"))
    assert "| 2 | 0.850 |" in bare and "| n/a | n/a |" in bare
    variant = next(line for line in table.splitlines() if line.startswith("| bias | genseg x |"))
    assert "| +0.050 (n/a, n=1) | +0.010 (n/a, n=1) |" in variant
    datasets = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line]
    assert datasets == ["bias"] * 3 + ["skull"]  # one block per dataset
