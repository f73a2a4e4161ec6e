"""`genseg export-onnx`: ONNX Runtime gives the same probabilities as PyTorch, for any batch size; the int8 export
is calibrated on the run's own training slices, checked against fp32 on its held-out splits (refused past the Dice
threshold), and every command that segments runs it with `--precision int8`; bad inputs get clear errors."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

from genseg.cli import main
from genseg.errors import CheckpointError, ConfigError
from genseg.evaluation.evaluate import evaluate
from genseg.inference.files import segment_files
from genseg.inference.onnx import INT8_FILE, METADATA_KEY, OnnxSegmenter, cpu_features, int8_format
from genseg.inference.segmenter import load_segmenter
from genseg.runs import SegTrainConfig
from genseg.serve.codec import rle_decode
from genseg.serve.testing import ServerProcess, make_untrained_segmenter, post_json
from genseg.training.seg import train_segmenter
from genseg.workflows.export import export_onnx
from seg_helpers import one_torch_thread, phantom, write_phantoms  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.mark.parametrize("channels", [1, 3])
def test_onnx_runtime_matches_pytorch(tmp_path, channels):
    run_dir = make_untrained_segmenter(tmp_path / "seg", size=64, base_channels=8, depth=3, channels=channels, seed=3)
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export-onnx", "--checkpoint", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((5, channels, 64, 64)).astype(np.float32)
    onnx_probs = session.run(["probability"], {"image": images})[0]
    torch_probs = load_segmenter(run_dir, device="cpu").predict(images)
    assert onnx_probs.shape == (5, 1, 64, 64)
    assert np.abs(onnx_probs[:, 0] - torch_probs).max() < 1e-4
    assert not list(tmp_path.glob(".model.onnx.*"))  # written atomically, no temporary left behind
    exported = load_segmenter(out)  # an .onnx --checkpoint: the same Segmenter interface
    assert (exported.precision, exported.size, exported.channels, exported.threshold) == ("fp32", 64, channels, 0.5)
    assert np.abs(exported.predict(images) - torch_probs).max() < 1e-4


def test_export_from_a_missing_run_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["export-onnx", "--checkpoint", str(tmp_path / "nothing"),
                                       "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "not found" in result.output and not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 32 px width-8 segmenter trained on phantoms until it segments them, with its int8 export made by the CLI
    with the default calibration file (the run's own training data, from run.json). Its held-out splits have 8
    slices each, where one slice's Dice moves the mean by hundredths, so the threshold here is 0.05 (the default
    0.005 is for real held-out sets; its refusal is tested below). 40 epochs: shorter runs left specks on
    tumour-free slices for some seeds and thread counts."""
    folder = tmp_path_factory.mktemp("int8")
    data = write_phantoms(folder / "real.h5", n=40, size=SIZE, patients=10)
    cfg = SegTrainConfig(size=SIZE, base_channels=8, depth=2, batch_size=4, epochs=40, patience=None,
                         loss="bce+dice", lr=1e-2, hflip=False, max_rotation=0.0, plot_samples=1, bn_stat_slices=64)
    result = train_segmenter(cfg, data, folder / "run")
    assert result.metrics["test"]["dice"] > 0.8, result.metrics["test"]
    done = CliRunner().invoke(main, ["export-onnx", "--checkpoint", str(folder / "run"), "--int8",
                                     "--max-dice-change", "0.05"])
    assert done.exit_code == 0, done.output
    assert "accuracy check: val (8 slices): Dice fp32" in done.output
    return folder / "run"


def test_int8_export_records_the_guard_and_evaluate_reproduces_it(run):
    int8 = load_segmenter(run, precision="int8")
    assert isinstance(int8, OnnxSegmenter) and int8.precision == "int8" and int8.source.endswith(INT8_FILE)
    meta = int8.metadata
    assert meta["quantisation"]["calibration_selection"] == {"split": "train"}
    assert meta["quantisation"]["calibration_slices"] == 24  # all 24 training slices: fewer than the 32 asked
    assert meta["quantisation"]["calibration_file"].endswith("real.h5") and meta["guard"]["max_dice_change"] == 0.05
    data = run.parent / "real.h5"
    for role in ("val", "test"):
        row = meta["guard"]["splits"][role]
        assert abs(row["dice_change"]) <= 0.05 and row["mask_dice_fp32_vs_int8"] > 0.95
        assert row["dice_fp32"] == pytest.approx(evaluate(run, data, split=role, progress=False)["dice"], abs=1e-9)
        scored = evaluate(run, data, split=role, progress=False, precision="int8")
        assert scored["precision"] == "int8" and scored["dice"] == pytest.approx(row["dice_int8"], abs=1e-9)


def test_int8_runs_segment_serve_and_the_pipeline(run, tmp_path):
    from diffusion_helpers import tiny_generator

    from genseg.workflows.pipeline_run import load_pipeline

    image, _ = phantom(np.random.default_rng(5), 48, True)
    png = tmp_path / "scan.png"
    Image.fromarray((image * 255).astype(np.uint8)).save(png)
    report = segment_files([png], run, tmp_path / "masks", progress=False, precision="int8")
    assert report["segmented"] == [str(png)]
    cli_mask = np.asarray(Image.open(tmp_path / "masks" / "scan_mask.png")) > 0
    assert cli_mask.any()

    body = {"instances": [{"b64": base64.b64encode(png.read_bytes()).decode()}], "parameters": {"mask_format": "rle"}}
    with ServerProcess(run, max_batch=4, extra_args=["--precision", "int8"]) as server:
        status, answer = post_json(server.port, "/predict", body)
        assert "(int8)" in server.output()
    assert status == 200, answer
    assert np.array_equal(rle_decode(answer["predictions"][0]["mask"]) > 0, cli_mask)  # served = CLI, both int8

    generator = tiny_generator(tmp_path)
    with pytest.raises(CheckpointError, match="a pipeline registers the PyTorch segmenter"):
        load_pipeline(diffusion=generator, segmenter=run / "model" / INT8_FILE)
    pipe = load_pipeline(diffusion=generator, segmenter=run, precision="int8")
    assert pipe.predictor().precision == "int8"
    x = np.random.default_rng(0).random((2, SIZE, SIZE)).astype(np.float32)
    assert np.array_equal(pipe.segment(x), load_segmenter(run, precision="int8").predict(x[:, None]))
    other = make_untrained_segmenter(tmp_path / "seg16", size=16, base_channels=4, depth=2)
    with pytest.raises(ConfigError, match="reads 16 px, 1 channel\\(s\\); the pipeline's segmenter reads 32 px"):
        pipe.use_predictor(load_segmenter(export_onnx(other, tmp_path / "16.onnx")["path"]))


def test_int8_export_refuses_past_the_dice_threshold(run, tmp_path, monkeypatch):
    import genseg.workflows.export as onnx_module

    row = {"selection": {"split": "val"}, "slices": 8, "dice_fp32": 0.9, "dice_int8": 0.88, "dice_change": -0.02,
           "mask_dice_fp32_vs_int8": 0.97}
    monkeypatch.setattr(onnx_module, "accuracy_guard", lambda *args: {"val": row, "test": {**row, "dice_change": 0}})
    out = tmp_path / "refused.onnx"
    done = CliRunner().invoke(main, ["export-onnx", "--checkpoint", str(run), "--int8", "--out", str(out)])
    assert done.exit_code == 2
    assert "int8 export refused, nothing written: the Dice change exceeds 0.005" in done.output
    assert "val (8 slices): Dice fp32 0.9000 -> int8 0.8800 (-0.0200)" in done.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_calibration_files_are_clear_errors(run, tmp_path):
    cases = {"other size": (write_phantoms(tmp_path / "16.h5", n=20, size=16),
                            "slices are 16x16 with 1 channel(s), the model expects 32x32 with 1"),
             "other channels": (write_phantoms(tmp_path / "rgb.h5", n=20, size=SIZE, channels=3),
                                "slices are 32x32 with 3 channel(s), the model expects 32x32 with 1"),
             "empty split": (write_phantoms(tmp_path / "two.h5", n=8, size=SIZE, patients=2),  # folds 1, 2 only
                             "has no training slices to calibrate on for {'split': 'train'}")}
    for name, (data, message) in cases.items():
        out = tmp_path / f"{name}.onnx"
        done = CliRunner().invoke(main, ["export-onnx", "--checkpoint", str(run), "--int8", "--calibration",
                                         str(data), "--out", str(out)])
        assert done.exit_code == 2 and message in done.output, (name, done.output)
        assert not out.exists()


def test_int8_without_onnxruntime_says_how_to_install(run, tmp_path):
    """A fresh interpreter in which onnxruntime cannot be imported, as in an install without the onnx extra."""
    script = ("import sys; sys.modules['onnxruntime'] = None\n"
              "from click.testing import CliRunner\nfrom genseg.cli import main\n"
              "for args in sys.argv[1:]:\n"
              "    done = CliRunner().invoke(main, args.split())\n"
              "    print(done.exit_code, done.output.strip())\n")
    commands = [f"export-onnx --checkpoint {run} --int8 --out {tmp_path / 'x.onnx'}",
                f"segment {tmp_path / 'none.png'} --checkpoint {run} --precision int8 --out {tmp_path / 'm'}"]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "none.png")
    done = subprocess.run([sys.executable, "-c", script, *commands], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout + done.stderr
    for line in lines:
        assert line.startswith("2 Error: int8 and .onnx models run through ONNX Runtime, which is not installed: "
                               "pip install 'genseg[onnx]'"), line
    assert not (tmp_path / "x.onnx").exists()


def test_bad_onnx_checkpoints_are_clear_errors(run, tmp_path):
    int8 = run / "model" / INT8_FILE
    (tmp_path / "garbage.onnx").write_bytes(b"not a model at all" * 10)
    (tmp_path / "truncated.onnx").write_bytes(int8.read_bytes()[: int8.stat().st_size // 2])
    image = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(image)
    for name in ("garbage.onnx", "truncated.onnx"):
        for command in (["segment", str(image), "--out", str(tmp_path / "masks")],
                        ["evaluate", "--data", str(run.parent / "real.h5")]):
            done = CliRunner().invoke(main, [*command, "--checkpoint", str(tmp_path / name)])
            assert done.exit_code == 2 and f"{name}: not a readable ONNX model (" in done.output, done.output
    assert not (tmp_path / "masks").exists()

    import onnx

    bare = onnx.load(str(int8))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(CheckpointError, match="without genseg's export metadata"):
        load_segmenter(tmp_path / "bare.onnx")
    with pytest.raises(CheckpointError, match="is an int8 export, not fp32"):
        load_segmenter(int8, precision="fp32")
    with pytest.raises(CheckpointError, match="has no int8 export .* `genseg export-onnx"):
        load_segmenter(make_untrained_segmenter(tmp_path / "fresh", size=SIZE, base_channels=8, depth=2),
                       precision="int8")


def test_a_stale_int8_export_is_refused(run, tmp_path):
    """Retraining replaces model/'s weights; the int8 file made from the old ones must not be served."""
    import shutil

    stale = shutil.copytree(run, tmp_path / "run")
    other = make_untrained_segmenter(tmp_path / "other", size=SIZE, base_channels=8, depth=2, seed=9)
    shutil.copy(other / "model" / "diffusion_pytorch_model.safetensors", stale / "model")
    with pytest.raises(CheckpointError, match="exported from other weights .* export it again"):
        load_segmenter(stale, precision="int8")
    assert json.loads(OnnxSegmenter(stale / "model" / INT8_FILE).session.get_modelmeta()
                      .custom_metadata_map[METADATA_KEY])["precision"] == "int8"


def test_untrained_int8_helper_gives_a_loadable_export(tmp_path):
    """The benchmarks' int8 export of an untrained run (random calibration images) loads like a real one."""
    from genseg.serve.testing import make_untrained_int8

    run = make_untrained_segmenter(tmp_path / "r", size=SIZE, base_channels=4, depth=2, channels=3)
    assert make_untrained_int8(run) == run / "model" / INT8_FILE
    int8 = load_segmenter(run, precision="int8")
    assert (int8.precision, int8.size, int8.channels) == ("int8", SIZE, 3)
    assert int8.predict(np.zeros((2, 3, SIZE, SIZE), np.float32)).shape == (2, SIZE, SIZE)


@pytest.mark.slow
def test_the_shipped_demo_segmenter_quantises_within_the_default_guard(tmp_path, genseg_cli):
    """A real trained segmenter on its own held-out demo data, at the default 0.005 threshold: on CPUs without VNNI
    a format whose int16 sums saturate (u8s8) moves this model's test Dice by more than a tenth, so this fails
    there unless the export uses a format that is exact on every CPU."""
    import shutil

    pipeline = tmp_path / "pipeline"
    shutil.copytree(REPO / "genseg" / "demo_models" / "pipeline", pipeline)
    genseg_cli("demo-data", tmp_path / "raw")
    genseg_cli("prepare", tmp_path / "raw", "--out", tmp_path / "demo64.h5", "--size", 64)
    done = genseg_cli("export-onnx", "--checkpoint", pipeline, "--int8", "--calibration", tmp_path / "demo64.h5")
    meta = load_segmenter(pipeline, precision="int8").metadata
    for role in ("val", "test"):
        row = meta["guard"]["splits"][role]
        assert abs(row["dice_change"]) <= 0.005 and row["mask_dice_fp32_vs_int8"] > 0.98, (role, row, done.stdout)
    assert meta["quantisation"]["weight_format"] == int8_format("auto", cpu_features())


def test_the_int8_weight_format_follows_vnni_and_a_u8s8_file_is_refused_without_it(tmp_path):
    """u8s8 only where VNNI keeps its sums exact; a u8s8 file moved to an AVX2 CPU without VNNI is refused by name.
    The CPU cannot be swapped in a test, so the refusal is checked through the feature list it is given."""
    from genseg.inference.onnx import check_int8_format
    from genseg.serve.testing import make_untrained_int8

    assert int8_format("auto", ["avx2", "fma", "avx512f", "avx512_vnni"]) == "u8s8"
    assert int8_format("auto", ["avx2", "fma", "avx_vnni"]) == "u8s8"
    assert int8_format("auto", ["avx2", "fma"]) == "u8u8" and int8_format("auto", []) == "u8u8"
    assert int8_format("u8u8", ["avx512_vnni"]) == "u8u8"
    with pytest.raises(ConfigError, match="int8 format 's8s8'"):
        int8_format("s8s8", [])
    run = make_untrained_segmenter(tmp_path / "r", size=SIZE, base_channels=4, depth=2)
    for fmt in ("u8u8", "u8s8"):
        path = make_untrained_int8(run, weight_format=fmt, out=tmp_path / f"{fmt}.onnx")
        meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])
        assert meta["quantisation"]["weight_format"] == fmt
        check_int8_format(path, meta, ["avx2", "fma", "avx512_vnni"])
        check_int8_format(path, meta, [])  # not x86 (e.g. Arm): no saturating u8s8 path
        if fmt == "u8u8":
            check_int8_format(path, meta, ["avx2", "fma"])
        else:
            with pytest.raises(CheckpointError, match="u8s8 int8 export .* this CPU has no VNNI"):
                check_int8_format(path, meta, ["avx2", "fma"])
