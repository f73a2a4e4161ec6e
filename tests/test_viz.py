"""Figure helpers: colour conversion, mask overlays and captioned grids written as real PNG files."""

import numpy as np
import pytest
from PIL import Image

from genseg.viz import MASK_COLOR, grid_image, grid_layout, outline, overlay, save_grid, save_png, to_rgb


def test_to_rgb_takes_float_grey_channel_first_and_uint8():
    grey = np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32)
    rgb = to_rgb(grey)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[..., 0].tolist() == [[0, 128], [255, 255]]  # floats are [0, 1], clipped
    assert np.array_equal(to_rgb(grey[None]), rgb)  # (1, H, W) as prepared files store it
    colour = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert np.array_equal(to_rgb(colour), colour) and np.array_equal(to_rgb(np.moveaxis(colour, -1, 0)), colour)
    with pytest.raises(ValueError, match="shape"):
        to_rgb(np.zeros((2, 2, 4)))


def test_overlay_tints_the_mask_outlines_it_and_leaves_the_rest():
    image = np.full((9, 9), 0.5)
    mask = np.zeros((9, 9), dtype=np.uint8)
    mask[2:7, 2:7] = 1
    edge = outline(mask)
    assert edge.sum() == 16 and not edge[3:6, 3:6].any()  # the 5x5 square's ring, interior left out
    out = overlay(image, mask, alpha=0.5)
    assert (out[mask == 0] == 128).all()
    assert (out[edge] == MASK_COLOR).all()
    assert out[4, 4].tolist() == [round(0.5 * 128 + 0.5 * c) for c in MASK_COLOR]
    assert (overlay(image, mask, contour=False)[edge] != MASK_COLOR).any()
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, mask[:5])


def test_grid_places_captioned_tiles_in_rows(tmp_path):
    tiles = [np.full((10, 12), v) for v in (0.0, 0.5, 1.0)]
    grid = grid_image(tiles, ncols=2, titles=["a", "b", "c"], pad=2, font_size=8)
    caption = 8 + 4
    assert grid.size == (2 * (12 + 2) + 2, 2 * (10 + caption + 2) + 2)
    pixels = np.asarray(grid)
    assert (pixels[2 + caption, 2 + 14] == 128).all() and (pixels[2 + 2 * caption + 12, 2] == 255).all()
    path = save_grid(tiles, tmp_path / "grid.png", ncols=3)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (3 * (12 + 4) + 4, 10 + 2 * 4)  # default pad 4
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left
    with pytest.raises(ValueError, match="2 titles for 3 tiles"):
        grid_image(tiles, 2, titles=["a", "b"])
    with pytest.raises(ValueError, match="no tiles"):
        grid_image([], 2)


def test_save_png_writes_arrays_and_pil_images(tmp_path):
    save_png(np.eye(4), tmp_path / "eye.png")
    with Image.open(tmp_path / "eye.png") as png:
        assert np.asarray(png.convert("L")).tolist() == (np.eye(4) * 255).astype(int).tolist()


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("side", [64, 256])
@pytest.mark.parametrize("count", [1, 4, 16, 50])
def test_contact_sheet_captions_never_overlap_and_stay_inside(side, count):
    """The captions `genseg pipeline` writes (the longest numbers it can print), as the contact sheet lays them
    out: their ink boxes meet neither each other nor a tile, lie inside the figure, and hold every caption pixel."""
    from genseg.workflows.pipeline_run import CONTACT_SHEET_COLUMNS, caption

    rows = [{"index": i, "tumour_share": 1.0, "dice_generated_vs_predicted": 0.86} for i in range(count)]
    tiles = [np.zeros((side, side)) for _ in rows]
    titles = [caption(r) for r in rows]
    layout = grid_layout([t.shape for t in tiles], CONTACT_SHEET_COLUMNS, titles)
    width, height = layout.size
    tile_boxes = [(x, y, x + side, y + side) for x, y in layout.tiles]
    boxes = layout.caption_boxes
    assert all(0 <= b[0] and 0 <= b[1] and b[2] <= width and b[3] <= height for b in boxes + tile_boxes)
    for i, box in enumerate(boxes):
        assert not any(_overlaps(box, other) for other in boxes[i + 1:] + tile_boxes), (i, titles[i])
    assert all(" ".join(text for _, text in lines) == title for lines, title in zip(layout.lines, titles))
    pixels = np.asarray(grid_image(tiles, CONTACT_SHEET_COLUMNS, titles))
    ys, xs = np.nonzero(pixels.max(axis=-1) > 40)  # text; tiles are black, the background is (16, 16, 16)
    inside = np.zeros(len(xs), bool)
    for left, top, right, bottom in boxes:
        inside |= (left <= xs) & (xs < right) & (top <= ys) & (ys < bottom)
    assert len(xs) and inside.all()


def test_a_caption_wider_than_its_tile_wraps_and_a_long_word_widens_the_cell():
    titles = ["image", "truth", "prediction", "truth red, pred. green"]  # the segmenter's sample grids
    layout = grid_layout([(64, 64)] * 4, 4, titles)
    assert len(layout.lines[3]) > 1 and " ".join(text for _, text in layout.lines[3]) == titles[3]
    assert all(b[2] <= layout.tiles[i][0] + 64 + 2 for i, b in enumerate(layout.caption_boxes))
    wide = grid_layout([(8, 8)], 1, ["supercalifragilistic"])
    assert wide.caption_boxes[0][2] <= wide.size[0] and wide.tiles[0][0] > 4  # tile centred in the wider cell
