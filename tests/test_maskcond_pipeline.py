"""A mask-conditioned generator end to end (issue 15, item 4): `genseg pipeline --masks-from` writes images for the
given masks with their mask faithfulness, and a pipeline server generates for masks sent as the instances.
Everything mode-related is refused before anything is sampled or written."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from genseg.cli import main
from genseg.errors import ConfigError
from genseg.evaluation.metrics import dice_iou
from genseg.models.diffusion import make_sampling_scheduler
from genseg.pipeline.diffusion import seed_generators
from genseg.pipeline.genseg_pipeline import GenSegPipeline
from genseg.serve.codec import rle_decode
from genseg.serve.testing import ServerProcess, post_json, request
from genseg.workflows.pipeline_run import run_pipeline
from genseg.workflows.sampling import draw_masks

from diffusion_helpers import quiet, tiny_pipeline
from seg_helpers import write_phantoms

SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("maskcond-pipeline")


@pytest.fixture(scope="module")
def data(folder):
    return write_phantoms(folder / "masks.h5", n=12, size=SIZE, patients=6)


@pytest.fixture(scope="module")
def maskcond_dir(folder):
    return tiny_pipeline(folder / "maskcond", {"mode": "mask-conditioned"})


@pytest.fixture(scope="module")
def joint_dir(folder):
    return tiny_pipeline(folder / "joint")


def test_pipeline_generates_for_the_given_masks_and_reports_faithfulness(maskcond_dir, data, tmp_path):
    pipe = quiet(GenSegPipeline.load(maskcond_dir))
    assert pipe.mask_source == "given"
    summary = run_pipeline(pipe, tmp_path / "out", num=3, per_mask=2, masks_from=data, mask_augment=("flip",))
    drawn, _ = draw_masks(data, SIZE, 3, seed=0, augment=("flip",))
    assert summary["mask_source"] == "given" and summary["num_slices"] == 6
    assert len(summary["settings"]["mask_rows"]) == 3 and summary["settings"]["per_mask"] == 2
    assert summary["settings"]["mask_augment"] == ["flip"]
    assert len(list((tmp_path / "out" / "slices").glob("*_overlay.png"))) == 6
    for i, row in enumerate(summary["slices"]):
        assert row["given_area_px"] == int(drawn[i // 2].sum())  # mask i gives images 2i and 2i + 1
        assert "dice_generated_vs_predicted" not in row
    # the same call in process: the faithfulness is the Dice of the given mask with the segmenter's prediction
    again = pipe(6, masks=np.repeat(drawn, 2, axis=0), num_inference_steps=20, generator=seed_generators(0, 6))
    dice, _ = dice_iou(again.predicted_masks, np.repeat(drawn, 2, axis=0))
    assert [r["dice_given_vs_predicted"] for r in summary["slices"]] == pytest.approx(dice.tolist())
    assert summary["mean_dice_given_vs_predicted"] == pytest.approx(float(dice.mean()))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "mask faithfulness" in report and "3 given mask(s)" in report and "given mask outlined" in report


def test_pipeline_command_refuses_mode_mismatches_before_writing(maskcond_dir, joint_dir, data, tmp_path):
    runner = CliRunner()
    cases = [([f"--pipeline={maskcond_dir}"], "pass --masks-from"),
             ([f"--pipeline={joint_dir}", f"--masks-from={data}"], "need a mask-conditioned model"),
             ([f"--pipeline={joint_dir}", "--per-mask=2"], "need a mask-conditioned model"),
             ([f"--pipeline={maskcond_dir}", "--mask-augment=flip"], "give --masks-from too"),
             ([f"--pipeline={maskcond_dir}", f"--masks-from={data}", "--mask-augment=twist"], "unknown twist")]
    for args, words in cases:
        out = runner.invoke(main, ["pipeline", *args, "--out", str(tmp_path / "out"), "--save-pipeline",
                                   str(tmp_path / "saved"), "--steps", "2", "--num", "2"])
        assert out.exit_code != 0 and words in out.output, (args, out.output)
        assert not (tmp_path / "out").exists() and not (tmp_path / "saved").exists()


def test_pipeline_command_writes_the_given_masks(maskcond_dir, data, tmp_path):
    out = CliRunner().invoke(main, ["pipeline", "--pipeline", str(maskcond_dir), "--masks-from", str(data), "--num",
                                    "2", "--steps", "2", "--out", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    drawn, info = draw_masks(data, SIZE, 2, seed=0)
    assert summary["settings"]["mask_rows"] == info["mask_rows"]
    assert [r["given_area_px"] for r in summary["slices"]] == [int(m.sum()) for m in drawn]


def test_given_mask_checks_name_the_problem(maskcond_dir, tmp_path):
    bad = write_phantoms(tmp_path / "big.h5", n=6, size=32, patients=3)
    with pytest.raises(Exception, match="prepare the data with --size 16"):
        run_pipeline(quiet(GenSegPipeline.load(maskcond_dir)), tmp_path / "out", num=2, masks_from=bad)
    with pytest.raises(ConfigError, match="--num must be at least 1"):
        run_pipeline(quiet(GenSegPipeline.load(maskcond_dir)), tmp_path / "out", num=0, masks_from=bad)
    assert not (tmp_path / "out").exists()


# --- serving ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(maskcond_dir):
    with ServerProcess(maskcond_dir, extra_args=["--max-generate", "4"]) as srv:
        yield srv


def png_b64(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return {"b64": base64.b64encode(buffer.getvalue()).decode()}


def masks_for_request(data) -> np.ndarray:
    drawn, _ = draw_masks(data, SIZE, 2, seed=3)
    return drawn


def test_server_generates_for_masks_sent_as_instances(server, maskcond_dir, data):
    assert request(server.port, "GET", "/health") == (200, {"status": "ready", "generate": True,
                                                            "generate_masks": "given"})
    masks = masks_for_request(data)
    parameters = {"generate": 2, "steps": 2, "seed": 4, "scheduler": "ddim", "mask_format": "rle"}
    status, body = post_json(server.port, "/predict", {"instances": [png_b64(masks[0] * 255), masks[1].tolist()],
                                                       "parameters": parameters})
    assert status == 200, body
    pipe = quiet(GenSegPipeline.load(maskcond_dir))
    pipe.scheduler = make_sampling_scheduler("ddim", pipe.scheduler.config)
    expected = pipe(2, masks=masks, num_inference_steps=2, generator=seed_generators(4, 2))
    for i, prediction in enumerate(body["predictions"]):
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["image"]["data"]))))
        assert np.abs(image.astype(float) - expected.images[i] * 255).max() <= 0.5 + 1e-6
        assert np.array_equal(rle_decode(prediction["given_mask"]), masks[i])
        assert np.array_equal(rle_decode(prediction["mask"]), expected.predicted_masks[i])
        dice = dice_iou(expected.predicted_masks[i][None], masks[i][None])[0][0]
        assert prediction["dice_given_vs_predicted"] == pytest.approx(float(dice))
        assert "generated_mask" not in prediction


@pytest.mark.parametrize("instances, status, words", [
    ([{}], 400, "as many mask instances"),  # generate 2, one mask
    ([np.zeros((SIZE, SIZE)).tolist()] * 3, 400, "as many mask instances"),
    ([np.zeros((SIZE + 8, SIZE)).tolist()] * 2, 422, "16x16"),
    ([np.full((SIZE, SIZE), 2).tolist()] * 2, 422, "0 and 1 only"),
    ([np.zeros((SIZE, SIZE)).tolist(), {}], 400, "b64"),
    ([np.zeros((3, SIZE, SIZE)).tolist()] * 2, 422, "one 16x16 channel"),
])
def test_bad_mask_instances_get_a_4xx_and_the_server_keeps_serving(server, data, instances, status, words):
    answer, body = post_json(server.port, "/predict", {"instances": instances,
                                                       "parameters": {"generate": 2, "steps": 1}})
    assert answer == status, body
    assert words in body["error"]["message"]
    good = [np.zeros((SIZE, SIZE)).tolist()]  # an empty mask asks for a tumour-free slice
    assert post_json(server.port, "/predict", {"instances": good, "parameters": {"generate": 1, "steps": 1}})[0] == 200
