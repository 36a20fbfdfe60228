"""PNG plots of a run: curves per round and grids of pseudo-samples."""

from __future__ import annotations

import os
import struct
import sys

import pytest
import torch

from fed_dfkd.plots import (
    curve_points,
    plot_accuracy,
    plot_curves,
    plot_epsilon,
    save_image_grid,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def read_rgb(path) -> torch.Tensor:
    """The PNG's pixels as a [H, W, 3] tensor of uint8."""
    from matplotlib.image import imread

    pixels = torch.from_numpy(imread(path).copy())  # float in [0, 1], RGB or RGBA
    return (pixels[..., :3] * 255).round().to(torch.uint8)


HISTORY = [
    {"step": 1, "student_accuracy": 0.2, "epsilon": 0.5, "loss": 2.0},
    {"step": 2, "student_accuracy": None, "epsilon": 1.0},
    {"step": 3, "student_accuracy": float("nan"), "epsilon": float("inf")},
    {"step": 4, "epsilon": 2.0},
    {"step": 5, "student_accuracy": 0.7, "epsilon": 2.5},
]


def test_curve_points_skip_missing_none_and_non_finite_values_and_sort_by_x():
    history = [
        {"step": 5, "y": 0.5},
        {"step": 1, "y": None},
        {"step": 3, "y": float("nan")},
        {"step": 4, "y": float("-inf")},
        {"step": 6},
        {"step": 2.0, "y": 1},
        {"step": 7, "y": "a"},
        {"step": True, "y": 1.0},
        {"y": 1.0},
    ]
    assert curve_points(history, x="step", y="y") == ([2.0, 5.0], [1.0, 0.5])
    assert curve_points(HISTORY, x="step", y="student_accuracy") == ([1.0, 5.0], [0.2, 0.7])
    assert curve_points(HISTORY, x="step", y="epsilon") == ([1.0, 2.0, 4.0, 5.0],
                                                              [0.5, 1.0, 2.0, 2.5])
    assert curve_points(HISTORY, x="step", y="absent") == ([], [])


@pytest.mark.parametrize("history", [HISTORY, [], [{"step": 1, "student_accuracy": None}]])
def test_plot_accuracy_writes_a_png_even_with_gaps_or_no_data(tmp_path, history):
    path = tmp_path / "plots" / "accuracy.png"
    plot_accuracy(path, history, teacher_accuracy=0.95, ensemble_accuracy=None)
    width, height = png_size(path)
    assert 400 <= width <= 2000 and 300 <= height <= 1500
    assert os.path.getsize(path) > 5_000  # axes, title and labels were drawn
    assert os.listdir(path.parent) == ["accuracy.png"]


def test_plot_epsilon_and_plot_curves_write_pngs(tmp_path):
    plot_epsilon(tmp_path / "epsilon.png", HISTORY, epsilon_budget=8.0)
    plot_curves(tmp_path / "losses.png", HISTORY, x="step", ys={"loss": "loss", "ε": "epsilon"},
                title="Losses", ylabel="value", hlines={"target": 1.0})
    for name in ("epsilon.png", "losses.png"):
        width, height = png_size(tmp_path / name)
        assert 400 <= width <= 2000 and 300 <= height <= 1500


def test_plotting_does_not_import_pyplot(tmp_path):
    # pyplot would switch a global backend and keep figures alive; the module must not need it.
    if "matplotlib.pyplot" in sys.modules:
        pytest.skip("another test imported pyplot already")
    plot_accuracy(tmp_path / "a.png", HISTORY)
    save_image_grid(tmp_path / "g.png", torch.rand(2, 1, 8, 8))
    assert "matplotlib.pyplot" not in sys.modules


def test_small_grayscale_grid_is_upscaled_sharply_and_pixel_exact(tmp_path):
    generator = torch.Generator().manual_seed(0)
    # Values on the 8-bit grid, so the PNG can hold them exactly.
    levels = torch.randint(0, 256, (16, 1, 8, 8), generator=generator)
    path = tmp_path / "samples.png"
    save_image_grid(path, levels.float() / 255, nrow=8)
    # 8 columns of 8 px need a factor 4 to reach 32-px tiles (and a 256-px grid); 2-px gutters.
    assert png_size(path) == (8 * (32 + 2) + 2, 2 * (32 + 2) + 2)
    pixels = read_rgb(path)
    for index in (0, 9):
        top = 2 + (index // 8) * 34
        left = 2 + (index % 8) * 34
        tile = pixels[top:top + 32, left:left + 32]
        expected = levels[index, 0].repeat_interleave(4, 0).repeat_interleave(4, 1).to(torch.uint8)
        for channel in range(3):  # gray: the same value in R, G and B
            assert torch.equal(tile[..., channel], expected)
    assert torch.all(pixels[0, :] == 255)  # white gutter


def test_rgb_grid_without_upscaling_keeps_colours(tmp_path):
    images = torch.zeros(3, 3, 32, 32)
    images[0, 0] = 1.0  # red
    images[1, 1] = 1.0  # green
    images[2] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)  # blue
    path = tmp_path / "rgb.png"
    save_image_grid(path, images, nrow=2, upscale=1)
    assert png_size(path) == (2 * 34 + 2, 2 * 34 + 2)
    pixels = read_rgb(path)
    assert pixels[2 + 16, 2 + 16].tolist() == [255, 0, 0]
    assert pixels[2 + 16, 36 + 16].tolist() == [0, 255, 0]
    assert pixels[36 + 16, 2 + 16].tolist() == [0, 0, 255]
    assert pixels[36 + 16, 36 + 16].tolist() == [255, 255, 255]  # empty cell stays background


def test_uint8_images_read_as_0_to_255_and_values_are_clamped(tmp_path):
    as_uint8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    as_float = torch.tensor([-1.0, 128 / 255, 7.0]).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    save_image_grid(tmp_path / "u.png", as_uint8, upscale=1)
    save_image_grid(tmp_path / "f.png", as_float, upscale=1)
    assert torch.equal(read_rgb(tmp_path / "u.png"), read_rgb(tmp_path / "f.png"))
    assert read_rgb(tmp_path / "u.png")[2, 2:5, 0].tolist() == [0, 128, 255]


def test_labels_add_a_band_under_each_row_and_draw_text(tmp_path):
    images = torch.full((4, 1, 8, 8), 0.5)
    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    save_image_grid(plain, images, nrow=4, upscale=8)
    save_image_grid(labelled, images, nrow=4, upscale=8, labels=["zero", "one", "two", "three"])
    (plain_width, plain_height), (width, height) = png_size(plain), png_size(labelled)
    assert width == plain_width == 4 * 66 + 2
    assert height == plain_height + 16
    band = read_rgb(labelled)[2 + 64: 2 + 64 + 16]  # under the first row of tiles
    assert (band < 128).any()  # dark text pixels on the white band


def test_default_upscale_with_labels_gives_tiles_of_64_px(tmp_path):
    path = tmp_path / "l.png"
    save_image_grid(path, torch.rand(2, 1, 8, 8), nrow=8, labels=["a", "b"])
    assert png_size(path)[0] >= 2 * 64


@pytest.mark.parametrize(
    ("images", "kwargs", "message"),
    [
        (torch.rand(2, 2, 8, 8), {}, "C = 1 or 3"),
        (torch.rand(8, 8), {}, "C = 1 or 3"),
        (torch.rand(0, 1, 8, 8), {}, "no images"),
        (torch.rand(2, 1, 8, 8), {"labels": ["a"]}, "1 labels for 2 images"),
        (torch.rand(2, 1, 8, 8), {"nrow": 0}, "nrow"),
        (torch.rand(2, 1, 8, 8), {"upscale": 0}, "upscale"),
    ],
)
def test_bad_grid_arguments_raise(tmp_path, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        save_image_grid(tmp_path / "x.png", images, **kwargs)
    assert not (tmp_path / "x.png").exists()
