"""PNG plots of a run: curves per round and grids of pseudo-samples (DESIGN.md §7).

matplotlib is imported inside the functions, never when ``fed_dfkd`` is imported, and only its
object-oriented API is used (``Figure`` drawn by the Agg canvas), never ``pyplot``: no global
backend is switched, no GUI is needed, and no figure outlives the call. Every PNG is rendered in
memory and written atomically.
"""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fed_dfkd.runs import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

PathLike = str | os.PathLike[str]

_DPI = 100
# Grids narrower than this are upscaled (nearest neighbour): 8x8 digits would be a speck otherwise.
_MIN_GRID_WIDTH_PX = 256
_MIN_TILE_PX = 32
_MIN_LABELLED_TILE_PX = 64  # room for a class name under each tile
_PADDING_PX = 2
_LABEL_BAND_PX = 16


def _new_figure(*, width_px: float, height_px: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)
    FigureCanvasAgg(figure)  # attaches the Agg canvas; savefig renders through it
    return figure


def _save_figure(figure: "Figure", path: PathLike) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    atomic_write_bytes(path, buffer.getvalue())


def _finite_number(value: Any) -> float | None:
    """``value`` as a float, or None for missing, non-numeric, NaN and ±inf values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def curve_points(
    history: Sequence[Mapping[str, Any]], *, x: str, y: str
) -> tuple[list[float], list[float]]:
    """The ``(record[x], record[y])`` points of ``history`` that can be drawn, sorted by x.

    Records lacking a key, or holding None, a non-number, NaN or ±inf there, are skipped.
    """
    points = []
    for record in history:
        x_value, y_value = _finite_number(record.get(x)), _finite_number(record.get(y))
        if x_value is not None and y_value is not None:
            points.append((x_value, y_value))
    points.sort(key=lambda point: point[0])
    return [point[0] for point in points], [point[1] for point in points]


def plot_curves(
    path: PathLike,
    history: Sequence[Mapping[str, Any]],
    *,
    x: str,
    ys: Mapping[str, str],
    title: str,
    ylabel: str,
    hlines: Mapping[str, float | None] | None = None,
    xlabel: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> None:
    """Write a line plot of ``history`` (e.g. the records of ``metrics.jsonl``) as a PNG.

    ``ys`` maps a legend label to the record key plotted against ``record[x]``. Records lacking
    either key, or holding None/NaN/inf there, are skipped. ``hlines`` maps a label to a constant
    drawn as a dashed horizontal line (a None value is skipped). ``xlabel`` defaults to ``x``.
    With no data at all the PNG still appears, saying so.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(width_px=720, height_px=450)
    axes = figure.add_subplot()
    plotted = curves = 0
    for label, key in ys.items():
        x_values, y_values = curve_points(history, x=x, y=key)
        if not x_values:
            continue
        # Markers keep a single point, or a curve with gaps, visible; on long runs they are noise.
        marker = "o" if len(x_values) <= 40 else None
        axes.plot(x_values, y_values, label=label, marker=marker, markersize=3.5, linewidth=1.6)
        plotted += 1
        curves += 1
    # Reference lines: dashed, in colours the curves (default cycle starts with blue) do not use.
    styles = iter([("--", "tab:red"), (":", "tab:green"), ("-.", "tab:purple")])
    for label, value in (hlines or {}).items():
        number = _finite_number(value)
        if number is None:
            continue
        style, color = next(styles, ("--", "0.35"))
        axes.axhline(number, linestyle=style, linewidth=1.3, color=color,
                     label=f"{label} ({number:.4g})")
        plotted += 1
    if not curves:
        axes.text(0.5, 0.5, "no data yet", transform=axes.transAxes, ha="center", va="center",
                  color="0.5", fontsize=14)
    axes.set_title(title)
    axes.set_xlabel(xlabel if xlabel is not None else x)
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.grid(True, alpha=0.3)
    if plotted:
        axes.legend(loc="best", fontsize=9)
    figure.tight_layout()
    _save_figure(figure, path)


def plot_accuracy(
    path: PathLike,
    history: Sequence[Mapping[str, Any]],
    *,
    teacher_accuracy: float | None = None,
    ensemble_accuracy: float | None = None,
    xlabel: str = "round",
) -> None:
    """Student accuracy per step, with the teachers' best and the ensemble's accuracy as references.

    Reads ``record["student_accuracy"]`` against ``record["step"]``. The y axis spans [0, 1]
    when every value is a fraction, so plots of different runs compare at a glance.
    """
    hlines = {"teacher": teacher_accuracy, "teacher ensemble": ensemble_accuracy}
    values = curve_points(history, x="step", y="student_accuracy")[1]
    values += [number for number in map(_finite_number, hlines.values()) if number is not None]
    ylim = (0.0, 1.02) if all(0.0 <= value <= 1.0 for value in values) else None
    plot_curves(path, history, x="step", ys={"student": "student_accuracy"},
                title="Student accuracy", ylabel="accuracy", hlines=hlines, xlabel=xlabel,
                ylim=ylim)


def plot_per_class(
    path: PathLike,
    classes: Sequence[str],
    series: Mapping[str, Sequence[float | None] | None],
) -> None:
    """Grouped bars: each series' accuracy on every class (a None series or value is left out),
    so a class the student lags on stands out beside the teachers' bar."""
    shown = {label: values for label, values in series.items() if values is not None}
    width_px = max(720, 60 * len(classes) + 160)
    figure = _new_figure(width_px=width_px, height_px=450)
    axes = figure.add_subplot()
    bar = 0.8 / max(len(shown), 1)
    for index, (label, values) in enumerate(shown.items()):
        points = [(k, number) for k, number in enumerate(map(_finite_number, values)) if number is not None]
        axes.bar([k - 0.4 + bar * (index + 0.5) for k, _ in points], [v for _, v in points], width=bar,
                 label=label)
    slanted = max(map(len, classes), default=0) > 3  # class names, not digits: tilt them
    axes.set_xticks(range(len(classes)))
    axes.set_xticklabels(list(classes), rotation=30 if slanted else 0, ha="right" if slanted else "center",
                         fontsize=9)
    axes.set_ylim(0.0, 1.15)  # room for the legend above the bars
    axes.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_ylabel("test accuracy")
    axes.set_title("Accuracy per class")
    axes.grid(True, axis="y", alpha=0.3)
    if shown:
        axes.legend(loc="upper center", ncol=len(shown), fontsize=9)
    else:
        axes.text(0.5, 0.5, "no data yet", transform=axes.transAxes, ha="center", va="center",
                  color="0.5", fontsize=14)
    figure.tight_layout()
    _save_figure(figure, path)


def plot_epsilon(
    path: PathLike,
    history: Sequence[Mapping[str, Any]],
    *,
    epsilon_budget: float | None = None,
    xlabel: str = "round",
) -> None:
    """Cumulative privacy loss ε per step (``record["epsilon"]``), with the budget ε_max."""
    plot_curves(path, history, x="step", ys={"ε spent": "epsilon"},
                title="Privacy loss (cumulative)", ylabel="ε", xlabel=xlabel,
                hlines={"budget ε_max": epsilon_budget})


def _upscale_factor(height: int, width: int, *, columns: int, labelled: bool) -> int:
    smallest_tile = _MIN_LABELLED_TILE_PX if labelled else _MIN_TILE_PX
    for_tile = math.ceil(smallest_tile / min(height, width))
    for_grid = math.ceil(_MIN_GRID_WIDTH_PX / (columns * width))
    return max(1, for_tile, for_grid)


def save_image_grid(
    path: PathLike,
    images: "Tensor",
    *,
    nrow: int = 8,
    labels: Sequence[str] | None = None,
    upscale: int | None = None,
) -> None:
    """Write a grid of images (``[N, C, H, W]``, C = 1 or 3, values in [0, 1]) as a PNG.

    ``nrow`` is the number of images per row, as in ``torchvision.utils.make_grid``. Values are
    clamped to [0, 1] and NaN shown as 0 (a uint8 tensor is read as 0..255); one channel is shown
    as gray. Pixels are enlarged by ``upscale`` with nearest-neighbour (by default just enough for
    tiles of at least 32 px, 64 px with labels, and a grid at least 256 px wide), so small images
    stay sharp. ``labels`` (one per image, e.g. the teacher's predicted class) are written under
    the tiles.
    """
    import numpy
    import torch

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C = 1 or 3, got {list(images.shape)}")
    count, channels, height, width = images.shape
    if count == 0:
        raise ValueError("no images to draw")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if labels is not None and len(labels) != count:
        raise ValueError(f"{len(labels)} labels for {count} images")
    if upscale is not None and upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")

    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    factor = upscale or _upscale_factor(height, width, columns=columns,
                                        labelled=labels is not None)

    pixels = images.detach().cpu()
    # uint8 is the wire format of pseudo-batches (DESIGN.md §3): 0..255 means 0..1.
    pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    pixels = pixels.nan_to_num(0.0).clamp(0.0, 1.0)
    if channels == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    tiles = pixels.permute(0, 2, 3, 1).numpy()  # [N, H, W, 3]
    tiles = tiles.repeat(factor, axis=1).repeat(factor, axis=2)

    tile_height, tile_width = height * factor, width * factor
    band = _LABEL_BAND_PX if labels is not None else 0
    cell_height, cell_width = tile_height + band + _PADDING_PX, tile_width + _PADDING_PX
    grid_height = rows * cell_height + _PADDING_PX
    grid_width = columns * cell_width + _PADDING_PX
    grid = numpy.ones((grid_height, grid_width, 3), dtype=numpy.float32)  # white background
    for index in range(count):
        top = _PADDING_PX + (index // columns) * cell_height
        left = _PADDING_PX + (index % columns) * cell_width
        grid[top:top + tile_height, left:left + tile_width] = tiles[index]

    figure = _new_figure(width_px=grid_width, height_px=grid_height)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    axes.set_axis_off()
    # Figure and image have the same pixel size, so "nearest" maps one array pixel to one PNG pixel.
    axes.imshow(grid, interpolation="nearest", vmin=0.0, vmax=1.0, aspect="auto")
    if labels is not None:
        texts = [str(label) for label in labels]
        longest = max((len(text) for text in texts), default=1) or 1
        # One size for all labels; about 0.6 em per character in the default sans-serif font.
        font_px = max(7.0, min(11.0, tile_width / (0.6 * longest)))
        fitting_chars = max(1, int(tile_width / (0.6 * font_px)))
        for index, text in enumerate(texts):
            if len(text) > fitting_chars:
                text = text[: max(1, fitting_chars - 1)] + "…"
            top = _PADDING_PX + (index // columns) * cell_height
            left = _PADDING_PX + (index % columns) * cell_width
            # Data coordinates: pixel i spans [i - 0.5, i + 0.5].
            axes.text(left + tile_width / 2 - 0.5, top + tile_height + band / 2 - 0.5, text,
                      ha="center", va="center", fontsize=font_px * 72 / _DPI, color="black")
    _save_figure(figure, path)
