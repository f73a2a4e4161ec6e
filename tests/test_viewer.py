"""The viewer page of `genseg serve`, in a real headless Chromium against a real server process on 127.0.0.1:
upload a slice and a volume, move the threshold and slice sliders, read the area back, download the masks, and
see clear messages for bad uploads while the server keeps serving.

The browser is Debian's chromium (/usr/bin/chromium) driven by playwright; `.ci/run` installs it. Without it the
test fails, unless GENSEG_SKIP_BROWSER_TESTS=1 says to skip (for machines where no browser can be installed).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from genseg.serve.app import MAX_BODY_BYTES
from genseg.serve.testing import ServerProcess, free_port, request
from genseg.serve.viewer import PAGE_SLICES, VIEWER_SEGMENT_ROUTE

from diffusion_helpers import tiny_pipeline

CHROMIUM = Path("/usr/bin/chromium")
SKIP_VARIABLE = "GENSEG_SKIP_BROWSER_TESTS"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS_FOR_REVIEW = Path("/tmp/viewer-shots")

try:
    from playwright.sync_api import expect
except ImportError:  # reported by the browser fixture, with how to install it
    expect = None


def spread_probabilities(pipeline: Path, gain: float = 300.0) -> None:
    """Scale the untrained segmenter's output layer so its probabilities spread over (0, 1), as a trained
    model's do; untrained, they all sit within a few hundredths of 0.5 and every threshold gives all or nothing."""
    import torch

    from genseg.models.unet import SegmentationUNet

    folder = pipeline / "segmenter"
    model = SegmentationUNet.from_pretrained(folder, use_safetensors=True)
    with torch.no_grad():
        model.outc.weight *= gain
        model.outc.bias.zero_()
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A pipeline server (--checkpoint takes a pipeline folder too): it segments with the pipeline's segmenter
    and generates."""
    pipeline = tiny_pipeline(tmp_path_factory.mktemp("viewer"))
    spread_probabilities(pipeline)
    with ServerProcess(pipeline, env={"AIP_HTTP_PORT": str(free_port())}, extra_args=["--max-generate", "2"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    missing = [what for what, there in ((f"Debian's chromium at {CHROMIUM} (apt-get install -y chromium "
                                         f"chromium-driver)", CHROMIUM.is_file()),
                                        ("playwright (pip install 'genseg[test]')", expect is not None)) if not there]
    if missing:
        if os.environ.get(SKIP_VARIABLE) == "1":
            pytest.skip(f"{SKIP_VARIABLE}=1 opts out of the browser test; it needs {' and '.join(missing)}")
        pytest.fail(f"the viewer's browser test needs {' and '.join(missing)}; set {SKIP_VARIABLE}=1 to skip it "
                    f"only where no browser can be installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.wait_for_selector("body[data-state=idle]")
    yield page
    context.close()


def shoot(page, tmp_path: Path, name: str) -> None:
    """A screenshot in the test's tmp dir, and a copy where the reviewer looks."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    SHOTS_FOR_REVIEW.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS_FOR_REVIEW / path.name)


def upload(page, path: Path) -> None:
    page.set_input_files("#file-input", str(path))
    page.wait_for_selector("body[data-state=ready], body[data-state=error]")


def served_page(server, data: bytes, start: int = 0) -> dict:
    """The route's own answer for the same bytes, read without the browser."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", f"{VIEWER_SEGMENT_ROUTE}?start={start}", body=data,
                 headers={"Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 200, body
    return body


def expected_mask(probability_png: str, shape: tuple[int, int], threshold: float) -> np.ndarray:
    """The page's rule: 8-bit probability / 255 >= threshold, enlarged nearest-exact to the image's size."""
    probability = np.asarray(Image.open(io.BytesIO(base64.b64decode(probability_png))), np.float64)
    size = probability.shape[0]
    rows = np.minimum(size - 1, ((np.arange(shape[0]) + 0.5) * size / shape[0]).astype(int))
    cols = np.minimum(size - 1, ((np.arange(shape[1]) + 0.5) * size / shape[1]).astype(int))
    return (probability[np.ix_(rows, cols)] / 255 >= threshold).astype(np.uint8)


def shown_area(page) -> int:
    return int(page.text_content("#area"))


def tinted_pixels(page) -> int:
    """Pixels of the drawn canvas the overlay tinted (the slice is grey, the overlay green)."""
    data = page.eval_on_selector("#view", "c => c.toDataURL('image/png')")
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB"), np.int16)
    return int((rgb[..., 1] != rgb[..., 0]).sum())


def set_threshold(page, value: float) -> None:
    """Moves the slider as a keyboard user does: Home (0), then arrow steps of 0.01."""
    page.focus("#threshold")
    page.keyboard.press("Home")
    for _ in range(round(value * 100)):
        page.keyboard.press("ArrowRight")


def slice_png(tmp_path: Path, seed: int = 1, shape=(40, 48)) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image = 60 + 120 * (((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2) < (shape[0] / 3) ** 2)
    path = tmp_path / f"slice{seed}.png"
    Image.fromarray((image + rng.normal(0, 25, shape)).clip(0, 255).astype(np.uint8)).save(path)
    return path


def nifti_volume(tmp_path: Path, shape=(24, 20, PAGE_SLICES + 8), name: str = "volume.nii.gz") -> Path:
    rng = np.random.default_rng(3)
    path = tmp_path / name
    affine = np.array([[-0.9, 0, 0, 90], [0, 0.9, 0, -110], [0, 0, 2.5, -60], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image((rng.random(shape) * 800).astype(np.int16), affine), path)
    return path


def test_a_slice_with_its_overlay_threshold_and_mask_download(page, server, tmp_path):
    path = slice_png(tmp_path)
    upload(page, path)
    assert page.get_attribute("body", "data-state") == "ready", page.text_content("#error")
    served = served_page(server, path.read_bytes())
    probability, shape = served["slices"][0]["probability"], tuple(served["shape"])
    full = shape[0] * shape[1]
    middle = min(np.arange(1, 100) / 100,  # the slider position whose mask covers closest to half the slice
                 key=lambda t: abs(int(expected_mask(probability, shape, t).sum()) - full / 2))
    areas = {}
    for threshold in (0.0, middle, 1.0):
        set_threshold(page, threshold)
        expected = expected_mask(probability, shape, threshold)
        assert page.text_content("#threshold-value") == f"{threshold:.2f}"
        areas[threshold] = shown_area(page)
        assert areas[threshold] == int(expected.sum())
        assert tinted_pixels(page) == areas[threshold]  # the overlay follows the threshold
    assert areas[0.0] == full > areas[middle] > 0 and areas[middle] >= areas[1.0]
    set_threshold(page, middle)
    rows, cols = np.nonzero(expected_mask(probability, shape, middle))
    assert page.text_content("#bbox") == (f"{cols.min()}, {rows.min()}, {cols.max()}, {rows.max()}" if rows.size
                                          else "none")
    shoot(page, tmp_path, "slice-threshold-middle")
    with page.expect_download() as download:
        page.click("#download-png")
    assert download.value.suggested_filename == "slice1_mask.png"
    download.value.save_as(tmp_path / "downloaded.png")
    mask = np.asarray(Image.open(tmp_path / "downloaded.png").convert("L"))
    assert np.array_equal(mask, expected_mask(probability, shape, middle) * 255)


def test_a_volume_is_paged_and_its_mask_downloads_as_nifti(page, server, tmp_path):
    path = nifti_volume(tmp_path)
    upload(page, path)
    assert page.get_attribute("body", "data-state") == "ready", page.text_content("#error")
    assert "40 slices" in page.text_content("#result-kind")
    data = path.read_bytes()
    pages = [served_page(server, data, start) for start in (0, PAGE_SLICES)]
    assert [len(p["slices"]) for p in pages] == [PAGE_SLICES, 8]
    slices = [s for p in pages for s in p["slices"]]
    shape = tuple(pages[0]["shape"])
    page.focus("#slice")
    page.keyboard.press("End")  # the last slice: its page is fetched when it is first shown
    expect(page.locator("#slice-value")).to_have_text(re.compile(r"^39 "))
    expect(page.locator("#notice")).to_have_text("")
    assert shown_area(page) == int(expected_mask(slices[39]["probability"], shape, 0.5).sum())
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#slice-value")).to_have_text(re.compile(r"^38 "))
    assert shown_area(page) == int(expected_mask(slices[38]["probability"], shape, 0.5).sum())
    shoot(page, tmp_path, "volume-slice-38")
    with page.expect_download() as download:
        page.click("#download-nifti")
    assert download.value.suggested_filename == "volume_mask.nii.gz"
    download.value.save_as(tmp_path / "downloaded.nii.gz")
    written = nib.load(tmp_path / "downloaded.nii.gz")
    source = nib.load(path)
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    assert np.allclose(written.affine, source.affine, atol=1e-5)
    expected = np.stack([expected_mask(s["probability"], shape, 0.5) for s in slices], -1)
    assert np.array_equal(np.asarray(written.dataobj), expected)


def test_bad_uploads_are_explained_and_the_server_keeps_serving(page, server, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some text, not an image")
    upload(page, text)
    assert page.get_attribute("body", "data-state") == "error"
    assert "not a PNG, JPEG" in page.text_content("#error") and page.is_visible("#error")
    shoot(page, tmp_path, "error-not-an-image")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_BODY_BYTES))
    upload(page, big)
    assert "larger than the server accepts" in page.text_content("#error")
    shoot(page, tmp_path, "error-too-large")
    status, body = _post_raw(server, big.read_bytes())  # the server's own limit, without the page's check
    assert status == 413 and "larger than" in body["error"]["message"]
    upload(page, slice_png(tmp_path, seed=2))
    assert page.get_attribute("body", "data-state") == "ready" and page.is_hidden("#error")
    assert request(server.port, "GET", "/health")[0] == 200


def _post_raw(server, data: bytes) -> tuple[int, dict]:
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", VIEWER_SEGMENT_ROUTE, body=data, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_volume_of_thousands_of_slices_comes_a_page_at_a_time(page, server, tmp_path):
    path = nifti_volume(tmp_path, shape=(8, 8, 3000), name="long.nii.gz")
    body = served_page(server, path.read_bytes(), start=2990)
    assert body["total"] == 3000 and [s["index"] for s in body["slices"]] == list(range(2990, 3000))
    upload(page, path)
    assert "3000 slices" in page.text_content("#result-kind")
    page.focus("#slice")
    page.keyboard.press("End")
    expect(page.locator("#slice-value")).to_have_text(re.compile(r"^2999 "))
    expect(page.locator("#notice")).to_have_text("")
    assert page.get_attribute("body", "data-state") == "ready"


def test_two_uploads_at_once(page, server, tmp_path):
    first, second = nifti_volume(tmp_path), slice_png(tmp_path, seed=4)
    held = []  # the first upload's request never leaves the browser, so it cannot come back before the second

    def hold_the_first(route):
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route(f"**{VIEWER_SEGMENT_ROUTE}*", hold_the_first)
    page.set_input_files("#file-input", str(first))
    for _ in range(500):  # routes are handled while playwright waits
        if held:
            break
        page.wait_for_timeout(20)
    assert held, "the first upload's request never reached the browser's network layer"
    page.set_input_files("#file-input", str(second))
    expect(page.locator("#result-name")).to_have_text("slice4.png")
    page.wait_for_selector("body[data-state=ready]")
    assert "cancelled" in page.text_content("#notice") and page.is_hidden("#error")
    shoot(page, tmp_path, "two-uploads")
    results = [None, None]  # and two clients at the same moment, straight to the route

    def client(i, data):
        results[i] = _post_raw(server, data)

    threads = [threading.Thread(target=client, args=(i, p.read_bytes())) for i, p in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in results] == [200, 200]
    assert results[0][1]["total"] == 40 and results[1][1]["total"] == 1


def test_the_generate_panel_shows_image_mask_and_prediction(page, server, tmp_path):
    assert page.is_visible("#generate-panel")
    page.fill("#gen-steps", "2")
    page.fill("#gen-seed", "7")
    page.click("#generate-button")
    page.wait_for_selector("#generated:not([hidden])")
    for image in ("#gen-image", "#gen-mask", "#gen-prediction"):
        assert page.eval_on_selector(image, "i => i.complete && i.naturalWidth") == 16
    dice = float(page.text_content("#gen-dice"))
    assert 0.0 <= dice <= 1.0
    shoot(page, tmp_path, "generate")
    page.fill("#gen-steps", "100000")  # over the server's limit: its message is shown
    page.click("#generate-button")
    page.wait_for_selector("#generate-error:not([hidden])")
    assert "steps must be a whole number" in page.text_content("#generate-error")


def test_the_page_and_its_files_come_from_the_package(server):
    import http.client

    for route, kind in (("/", "text/html"), ("/viewer/viewer.js", "text/javascript"),
                        ("/viewer/viewer.css", "text/css")):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", route)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200 and response.getheader("Content-Type").startswith(kind)
        assert "default-src 'self'" in response.getheader("Content-Security-Policy")
        assert b"http://" not in body and b"https://" not in body  # nothing fetched from elsewhere
        conn.close()
    assert request(server.port, "GET", "/viewer/secrets.txt")[0] == 404


def test_dicom_and_figshare_uploads_decode_like_segment(server, tmp_path):
    """A multi-frame DICOM is a volume with its geometry; a Figshare .mat one slice (straight to the route)."""
    from conftest import write_enhanced_mr

    from genseg.data.figshare import write_figshare_mat

    dicom = write_enhanced_mr(tmp_path / "enhanced.dcm", frames=4)
    body = served_page(server, dicom.read_bytes())
    assert body["kind"] == "dicom" and body["total"] == 4 and body["shape"] == [256, 256]
    assert body["affine"] is not None
    mask = np.zeros((48, 48), np.uint8)
    mask[10:20, 12:30] = 1
    write_figshare_mat(tmp_path / "1.mat", (np.arange(48 * 48).reshape(48, 48) % 700).astype(np.int16), mask, 2,
                       "P1")
    body = served_page(server, (tmp_path / "1.mat").read_bytes())
    assert body["kind"] == "mat" and body["total"] == 1 and body["shape"] == [48, 48] and body["affine"] is None
