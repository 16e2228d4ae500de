"""Pictures of routing: which expert each region went to, and how the load spread over the experts.

    from moezoo.app.pictures import routing_map_picture, expert_shares, load_chart
    maps = pipe(prompt="a red circle", return_routing=True).routing_maps       # per layer, int [B, h, w]
    picture = routing_map_picture(maps[2][0], num_experts=8, image=out.images[0])
    chart = load_chart(expert_shares(maps[2][0], 8), title="layer 2")

Both are drawn with PIL only (no plotting library): a routing map is the image under a colour per expert, one
cell per patch (or gate cell), with a legend; the load chart is one bar per expert in the same colours, with
the uniform share 1/E as a dashed line. Ids at or above ``num_experts`` name special experts (null, copy,
constant: see :class:`moezoo.zoo.layers.MoE`) and are drawn in greys.

Audio, where a token may use several experts (dynamic-capacity MoE), is drawn by count rather than by expert::

    picture = spectrogram_with_experts(level_db, out.experts_per_token[2][0], max_experts=9, frame_rate=62.5)
    chart = mean_experts_chart({"this prompt": per_layer, "speech": speech, "music": music}, highlight=2)

the first is the clip's mel spectrogram with, under it and one column block per frame in both, a bar per frame
of the experts that frame used; the second a grouped bar chart of the mean experts per token of every layer.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["expert_colors", "expert_labels", "expand_map", "routing_map_picture", "expert_shares", "load_chart",
           "spectrogram_colors", "spectrogram_with_experts", "mean_experts_chart"]

# The image shows through as brightness only: a pixel of value v (max of R, G, B in [0, 1]) is drawn as its
# expert's colour times (1 - MAP_SHADE + MAP_SHADE * v). The hue stays exactly the legend's, so a cell's
# expert is readable over any picture, and a red shape on black still stands out as the bright part.
MAP_SHADE = 0.5
MIN_SIDE = 256  # small pictures (16x16 digits) are enlarged to at least this (nearest neighbour: crisp cells)
MAX_SIDE = 512  # large ones (restored photographs) are reduced to at most this
GRID_MIN_CELL = 8  # draw patch borders only when a cell is at least this many display pixels wide
TEXT = (30, 30, 30)
BACKGROUND = (255, 255, 255)
SPECIAL_GREYS = ((90, 90, 90), (150, 150, 150), (200, 200, 200))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def expert_colors(num_ids: int, num_experts: int | None = None) -> np.ndarray:
    """uint8 [num_ids, 3]: routed experts get hues evenly around the colour wheel (alternating brightness so
    neighbours differ twice); ids from ``num_experts`` on (special experts) get greys."""
    num_experts = num_ids if num_experts is None else num_experts
    colors = []
    for e in range(num_ids):
        if e >= num_experts:
            colors.append(SPECIAL_GREYS[(e - num_experts) % len(SPECIAL_GREYS)])
            continue
        value = 0.95 if e % 2 == 0 else 0.72
        r, g, b = colorsys.hsv_to_rgb(e / max(num_experts, 1), 0.8, value)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return np.array(colors, dtype=np.uint8).reshape(num_ids, 3)


def expert_labels(num_experts: int, num_special: int = 0, names: Sequence[str] | None = None) -> list[str]:
    """``e0 .. e{E-1}`` (with ``names[e]`` appended when given), then ``special 0, ...`` for special experts."""
    labels = [f"e{e}" + (f" {names[e]}" if names and names[e] else "") for e in range(num_experts)]
    return labels + [f"special {s}" for s in range(num_special)]


def expand_map(map_hw: np.ndarray, height: int, width: int) -> np.ndarray:
    """A cell map [h, w] painted over an image of ``height x width`` pixels: cells are ``ceil(H / h)`` pixels
    (patch grids and gate cells both round up, so the last row/column of cells may be cut short)."""
    h, w = map_hw.shape
    cell_h, cell_w = math.ceil(height / h), math.ceil(width / w)
    rows = np.minimum(np.arange(height) // cell_h, h - 1)
    cols = np.minimum(np.arange(width) // cell_w, w - 1)
    return map_hw[rows[:, None], cols[None, :]]


def _as_rgb_uint8(image, height: int, width: int) -> np.ndarray | None:
    if image is None:
        return None
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[:2] != (height, width):
        array = np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))
    return array


def _display_scale(height: int, width: int, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE) -> float:
    side = max(height, width)
    if side < min_side:
        return float(min_side // side)  # an integer factor keeps every cell the same width
    return min(1.0, max_side / side)


def _colour_panel(map_hw: np.ndarray, colors: np.ndarray, image: np.ndarray | None, height: int, width: int,
                  scale: float) -> Image.Image:
    """One map over one image at display size, with patch borders when cells are large enough."""
    pixels = colors[expand_map(map_hw, height, width)]
    if image is not None:
        value = image.max(axis=-1, keepdims=True).astype(np.float32) / 255.0
        pixels = np.round(pixels * (1.0 - MAP_SHADE + MAP_SHADE * value)).astype(np.uint8)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    panel = Image.fromarray(pixels).resize(size, Image.NEAREST)
    h, w = map_hw.shape
    cell_h, cell_w = math.ceil(height / h) * scale, math.ceil(width / w) * scale
    if min(cell_h, cell_w) >= GRID_MIN_CELL and h * w > 1:
        draw = ImageDraw.Draw(panel)
        for i in range(1, h):
            y = round(i * cell_h)
            draw.line([(0, y), (size[0], y)], fill=BACKGROUND, width=1)
        for j in range(1, w):
            x = round(j * cell_w)
            draw.line([(x, 0), (x, size[1])], fill=BACKGROUND, width=1)
    return panel


def _legend(labels: Sequence[str], colors: np.ndarray, width: int) -> Image.Image:
    """Swatch + label for every id, wrapped into rows that fit ``width``."""
    font, swatch, pad = _font(13), 14, 6
    entries = [(label, tuple(int(c) for c in color)) for label, color in zip(labels, colors)]
    widths = [swatch + 4 + math.ceil(font.getlength(label)) + 2 * pad for label, _ in entries]
    rows, row, used = [], [], 0
    for entry, w in zip(entries, widths):
        if row and used + w > width:
            rows.append(row)
            row, used = [], 0
        row.append((entry, w))
        used += w
    rows.append(row)
    row_height = swatch + 2 * pad
    legend = Image.new("RGB", (width, row_height * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(legend)
    for r, row in enumerate(rows):
        x, y = pad, r * row_height + pad
        for (label, color), w in row:
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=color)
            draw.text((x + swatch + 4, y), label, fill=TEXT, font=font)
            x += w
    return legend


def routing_map_picture(
    map_: np.ndarray,
    num_experts: int,
    image=None,
    labels: Sequence[str] | None = None,
    num_special: int = 0,
    columns: int = 4,
    title: str = "",
) -> Image.Image:
    """The routing map of one sample as a picture with a legend (and a caption under it when given).

    Args:
        map_: int [h, w] (one image: the top-1 expert of each patch or cell) or [F, h, w] (a clip: one panel
            per frame, ``columns`` panels per row).
        num_experts: routed experts E (ids ``0..E-1``); every expert is in the legend, used or not.
        image: what the map is drawn over: PIL, uint8 or [0, 1] float [H, W, (C)] — or for a clip [F, H, W, C];
            None draws the colours alone on a ``h x w`` grid.
        labels: legend text per id (default ``e0, e1, ...``).
        num_special: special-expert ids after the routed ones (null, copy, constant), drawn in greys.
        columns: panels per row for a clip.
        title: a caption printed under the legend.
    """
    map_ = np.asarray(map_)
    frames = map_[None] if map_.ndim == 2 else map_
    if frames.ndim != 3 or 0 in frames.shape:
        raise ValueError(f"a routing map must be [h, w] or [F, h, w] with no empty axis, got shape {map_.shape}")
    num_ids = num_experts + num_special
    if frames.min() < 0 or frames.max() >= num_ids:
        raise ValueError(f"routing map ids must be in [0, {num_ids}) for {num_experts} experts + {num_special} "
                         f"special, got range [{frames.min()}, {frames.max()}]")
    labels = list(labels) if labels is not None else expert_labels(num_experts, num_special)
    if len(labels) != num_ids:
        raise ValueError(f"got {len(labels)} labels for {num_ids} expert ids")
    colors = expert_colors(num_ids, num_experts)
    images = [None] * len(frames) if image is None else (
        [image] if map_.ndim == 2 else [image[f] for f in range(len(frames))])
    if image is None:
        height, width = frames.shape[1:]
    else:
        first = np.asarray(images[0]) if not isinstance(images[0], Image.Image) else None
        height, width = (first.shape[:2] if first is not None else images[0].size[::-1])
    # A clip's panels are half the size of a single picture's, so a row of them stays readable.
    scale = _display_scale(height, width) if len(frames) == 1 else _display_scale(
        height, width, MIN_SIDE // 2, MAX_SIDE // 2)
    panels = [_colour_panel(m, colors, _as_rgb_uint8(im, height, width), height, width, scale)
              for m, im in zip(frames, images)]
    gap = 4 if len(panels) > 1 else 0
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    pw, ph = panels[0].size
    grid_w, grid_h = cols * pw + (cols - 1) * gap, rows * ph + (rows - 1) * gap
    legend = _legend(labels, colors, max(grid_w, 200))
    font = _font(13)
    # The title goes under the legend, as a caption: viewers put their buttons over the top corners.
    title_h = 22 if title else 0
    width = max(grid_w, legend.width, math.ceil(font.getlength(title)) + 4 if title else 0)
    picture = Image.new("RGB", (width, grid_h + legend.height + title_h), BACKGROUND)
    for i, panel in enumerate(panels):
        picture.paste(panel, ((i % cols) * (pw + gap), (i // cols) * (ph + gap)))
    picture.paste(legend, (0, grid_h))
    if title:
        ImageDraw.Draw(picture).text((2, grid_h + legend.height + 3), title, fill=TEXT, font=font)
    return picture


def expert_shares(map_: np.ndarray, num_ids: int) -> np.ndarray:
    """float [num_ids]: the share of patches (cells, over all frames) whose top-1 choice is each id; sums to 1."""
    ids = np.asarray(map_).reshape(-1)
    if ids.size == 0:
        raise ValueError("the routing map is empty")
    return np.bincount(ids, minlength=num_ids)[:num_ids] / ids.size


def load_chart(
    shares: Sequence[float],
    labels: Sequence[str] | None = None,
    num_experts: int | None = None,
    title: str = "",
    size: tuple[int, int] = (420, 260),
) -> Image.Image:
    """A bar chart of expert load: one bar per id in its routing-map colour, its share in % above it, and the
    uniform share 1/E (perfect balance over the routed experts) as a dashed line.

    Args:
        shares: per id, a share in [0, 1] (e.g. :func:`expert_shares`).
        labels: the text under each bar (default ``e0, e1, ...``).
        num_experts: routed experts E; ids from E on are special and drawn grey (default: all are routed).
        title: printed at the top.
        size: (width, height) in pixels.
    """
    shares = np.asarray(shares, dtype=np.float64)
    num_ids = len(shares)
    num_experts = num_ids if num_experts is None else num_experts
    if num_ids == 0 or not np.isfinite(shares).all() or shares.min() < 0:
        raise ValueError("shares must be a non-empty sequence of finite values >= 0")
    labels = list(labels) if labels is not None else expert_labels(num_experts, num_ids - num_experts)
    if len(labels) != num_ids:
        raise ValueError(f"got {len(labels)} labels for {num_ids} bars")
    colors = expert_colors(num_ids, num_experts)
    width, height = size
    chart = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(chart)
    small, font = _font(11), _font(13)
    left, right, top, bottom = 36, 8, 26 if title else 10, 34
    plot_h = height - top - bottom
    y_max = max(float(shares.max()), 1.0 / num_experts) * 1.15  # headroom for the value labels
    if title:
        draw.text((left, 5), title, fill=TEXT, font=font)
    axis_y = top + plot_h
    for tick in _ticks(y_max):
        y = axis_y - round(tick / y_max * plot_h)
        draw.line([(left - 3, y), (width - right, y)], fill=(232, 232, 232))
        draw.text((2, y - 6), f"{tick * 100:.0f}%", fill=TEXT, font=small)
    # The dashed balance line goes under the bars: where a bar covers it, the bar's colour is exact.
    uniform_y = axis_y - round(1.0 / num_experts / y_max * plot_h)
    for x in range(left, width - right, 8):
        draw.line([(x, uniform_y), (min(x + 4, width - right), uniform_y)], fill=(120, 120, 120))
    slot = (width - left - right) / num_ids
    bar_w = max(2, math.floor(slot * 0.7))
    for e, (share, label) in enumerate(zip(shares, labels)):
        x0 = left + round(e * slot + (slot - bar_w) / 2)
        bar_h = round(share / y_max * plot_h)
        if bar_h > 0:
            draw.rectangle([x0, axis_y - bar_h, x0 + bar_w - 1, axis_y - 1], fill=tuple(int(c) for c in colors[e]))
        value = f"{share * 100:.0f}"
        draw.text((x0 + bar_w / 2 - small.getlength(value) / 2, axis_y - bar_h - 13), value, fill=TEXT, font=small)
        short = label.split(" ")[0]  # "e3" under the bar; the routing map's legend has the full names
        draw.text((x0 + bar_w / 2 - small.getlength(short) / 2, axis_y + 4), short, fill=TEXT, font=small)
    draw.line([(left, axis_y), (width - right, axis_y)], fill=TEXT)
    note = f"dashed: uniform 1/{num_experts}"
    draw.text((width - right - font.getlength(note), height - 15), note, fill=(110, 110, 110), font=small)
    return chart


def _ticks(y_max: float, steps: Sequence[float] = (0.1, 0.25, 0.5)) -> list[float]:
    """Gridline values: the first of ``steps`` (default 10%, 25% or 50%) that fits at most 5 lines under
    ``y_max`` (the last step when none does)."""
    for step in steps:
        if y_max / step <= 5:
            break
    return [i * step for i in range(1, int(y_max / step) + 1)]


# ----------------------------------------------------------------------------------------------------------
# Audio: the spectrogram with the experts each frame used, and mean experts per token by layer
# ----------------------------------------------------------------------------------------------------------

# Quiet to loud: near black through blue, purple and orange to pale yellow, interpolated in RGB. Brightness
# rises monotonically, so the picture also reads in greyscale.
SPECTROGRAM_ANCHORS = np.array([(8, 8, 24), (40, 30, 110), (130, 40, 130), (220, 90, 60), (250, 200, 60),
                                (255, 255, 220)], dtype=np.float64)
DYNAMIC_RANGE_DB = 80.0  # the spectrogram shows the clip's loudest 80 dB; quieter is drawn as the quietest colour
SPECTROGRAM_WIDTH = 520  # frames get a whole number of pixels each, as many as fit in this
MEL_ROW_PX = 2  # pixels per mel band
EXPERT_ROW_PX = 10  # pixels per expert in the bars under the spectrogram
EXPERTS_BAR_COLOR = (79, 70, 229)
AXIS_LEFT = 46  # room for the axis labels left of the spectrogram and the bars
# The mean-experts chart: this prompt, then the reference series, in these colours.
SERIES_COLORS = ((79, 70, 229), (0, 150, 136), (230, 120, 20), (150, 150, 150))
GRID = (232, 232, 232)
MUTED = (110, 110, 110)


def spectrogram_colors(level_db: np.ndarray, dynamic_range_db: float = DYNAMIC_RANGE_DB) -> np.ndarray:
    """uint8 [..., 3]: levels in dB coloured from the quietest anchor (at ``max - dynamic_range_db`` and below)
    to the loudest (at the maximum)."""
    level_db = np.asarray(level_db, dtype=np.float64)
    top = float(level_db.max())
    position = np.clip((level_db - (top - dynamic_range_db)) / dynamic_range_db, 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(SPECTROGRAM_ANCHORS))
    channels = [np.interp(position, stops, SPECTROGRAM_ANCHORS[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def _time_step(seconds: float) -> float:
    """A tick spacing in seconds that puts 2-6 ticks on the time axis."""
    for step in (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0):
        if seconds / step <= 6:
            return step
    return 10.0 * math.ceil(seconds / 60.0)


def spectrogram_with_experts(
    level_db: np.ndarray,
    experts: np.ndarray,
    max_experts: int,
    frame_rate: float,
    max_hz: float | None = None,
    title: str = "",
    dynamic_range_db: float = DYNAMIC_RANGE_DB,
) -> Image.Image:
    """A clip's mel spectrogram (time on x, low bands at the bottom) and, under it on the same time axis, one
    bar per frame: how many experts that frame used.

    Frame ``t`` is the same column block in both: ``frame_px = max(1, SPECTROGRAM_WIDTH // T)`` pixels wide
    from ``x = AXIS_LEFT + t * frame_px``; the bars leave the block's last pixel column white when blocks are
    at least 4 pixels wide, so neighbouring frames stay apart. A bar is ``EXPERT_ROW_PX`` pixels per expert,
    in ``EXPERTS_BAR_COLOR``; the dashed line is the mean over the frames.

    Args:
        level_db: [n_mels, T] levels in dB, the lowest band first.
        experts: int [T]: experts each frame used, in [0, max_experts].
        max_experts: the top of the bars' axis (the most experts a token can choose).
        frame_rate: frames per second (the time axis; frame ``t`` is at ``t / frame_rate`` s).
        max_hz: the top band's frequency, for the axis label (None: no frequency labels).
        title: a caption under the picture; newlines start new lines.
        dynamic_range_db: the colours span the clip's loudest this many dB.
    """
    level_db, experts = np.asarray(level_db), np.asarray(experts)
    if level_db.ndim != 2 or 0 in level_db.shape or not np.isfinite(level_db).all():
        raise ValueError(f"level_db must be a finite [n_mels, frames] array, got shape {level_db.shape}")
    num_frames = level_db.shape[1]
    if experts.shape != (num_frames,):
        raise ValueError(f"experts must have one count per frame ({num_frames}), got shape {experts.shape}")
    if max_experts < 1 or experts.min() < 0 or experts.max() > max_experts:
        raise ValueError(f"expert counts must be in [0, {max_experts}] with max_experts >= 1, got range "
                         f"[{experts.min()}, {experts.max()}]")
    frame_px = max(1, SPECTROGRAM_WIDTH // num_frames)
    plot_w = num_frames * frame_px
    spectrogram = spectrogram_colors(level_db[::-1], dynamic_range_db)  # the lowest band at the bottom
    spectrogram = np.repeat(np.repeat(spectrogram, MEL_ROW_PX, axis=0), frame_px, axis=1)
    spec_h = spectrogram.shape[0]
    gap, bars_h, axis_h = 8, max_experts * EXPERT_ROW_PX, 20
    bars_top = spec_h + gap
    axis_y = bars_top + bars_h  # the bars stand on this line
    font, small = _font(13), _font(11)
    lines = title.splitlines() if title else []
    text_w = max([math.ceil(font.getlength(line)) + 4 for line in lines], default=0)
    width = max(AXIS_LEFT + plot_w + 8, text_w)
    picture = Image.new("RGB", (width, axis_y + axis_h + 17 * len(lines) + 4), BACKGROUND)
    picture.paste(Image.fromarray(spectrogram), (AXIS_LEFT, 0))
    draw = ImageDraw.Draw(picture)
    if max_hz is not None:
        top = f"{max_hz / 1000:g} kHz"
        draw.text((AXIS_LEFT - 4 - small.getlength(top), 0), top, fill=TEXT, font=small)
        draw.text((AXIS_LEFT - 4 - small.getlength("0 Hz"), spec_h - 12), "0 Hz", fill=TEXT, font=small)
    right = AXIS_LEFT + plot_w
    for count in sorted({0, max_experts // 2, max_experts}):
        y = axis_y - count * EXPERT_ROW_PX
        if count:
            draw.line([(AXIS_LEFT, y), (right - 1, y)], fill=GRID)
        label = str(count)
        draw.text((AXIS_LEFT - 4 - small.getlength(label), y - 6), label, fill=TEXT, font=small)
    # The dashed mean goes under the bars: where a bar covers it, the bar's colour is exact.
    mean_y = axis_y - round(float(experts.mean()) * EXPERT_ROW_PX)
    for x in range(AXIS_LEFT, right, 8):
        draw.line([(x, mean_y), (min(x + 4, right - 1), mean_y)], fill=MUTED)
    inner = frame_px - 1 if frame_px >= 4 else frame_px
    for t, count in enumerate(experts):
        if count:
            x0 = AXIS_LEFT + t * frame_px
            draw.rectangle([x0, axis_y - count * EXPERT_ROW_PX, x0 + inner - 1, axis_y - 1], fill=EXPERTS_BAR_COLOR)
    draw.line([(AXIS_LEFT, axis_y), (right - 1, axis_y)], fill=TEXT)
    step = _time_step(num_frames / frame_rate)
    for i in range(int(((num_frames - 1) / frame_rate) / step + 1e-9) + 1):
        seconds = i * step
        x = AXIS_LEFT + round((seconds * frame_rate + 0.5) * frame_px)  # frame t is centred on t / frame_rate
        draw.line([(x, axis_y), (x, axis_y + 3)], fill=TEXT)
        label = f"{seconds:g} s"
        draw.text((min(x - small.getlength(label) / 2, width - small.getlength(label) - 2), axis_y + 5), label,
                  fill=TEXT, font=small)
    for i, line in enumerate(lines):
        draw.text((2, axis_y + axis_h + 2 + 17 * i), line, fill=TEXT, font=font)
    return picture


def mean_experts_chart(
    series: dict[str, Sequence[float]],
    highlight: int | None = None,
    title: str = "",
    size: tuple[int, int] = (420, 260),
) -> Image.Image:
    """A grouped bar chart of mean experts per token: one group per layer, one bar per series in
    :data:`SERIES_COLORS` order (e.g. this prompt, then speech and music references), a legend, and the
    ``highlight`` layer's group on a tinted band.

    Args:
        series: name -> one value per layer (every series as long as the first).
        highlight: the layer to mark (None: none).
        title: printed at the top.
        size: (width, height) in pixels.
    """
    names = list(series)
    lengths = {name: len(values) for name, values in series.items()}
    if not 1 <= len(names) <= len(SERIES_COLORS) or len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"series must be 1 to {len(SERIES_COLORS)} names, each with one value per layer (all of "
                         f"one length >= 1), got lengths {lengths}")
    values = np.array([np.asarray(series[name], dtype=np.float64) for name in names])
    if not np.isfinite(values).all() or values.min() < 0:
        raise ValueError("mean experts must be finite values >= 0")
    num_layers = values.shape[1]
    if highlight is not None and not 0 <= highlight < num_layers:
        raise ValueError(f"highlight must be a layer in [0, {num_layers}), got {highlight}")
    width, height = size
    chart = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(chart)
    small, font = _font(11), _font(13)
    left, right, top, bottom = 30, 8, 44 if title else 26, 22
    plot_h = height - top - bottom
    axis_y = top + plot_h
    y_max = max(float(values.max()), 1.0) * 1.1
    if title:
        draw.text((left, 5), title, fill=TEXT, font=font)
    x = left  # the legend, one row under the title
    for name, color in zip(names, SERIES_COLORS):
        draw.rectangle([x, top - 18, x + 10, top - 8], fill=color)
        draw.text((x + 14, top - 20), name, fill=TEXT, font=small)
        x += 14 + math.ceil(small.getlength(name)) + 12
    slot = (width - left - right) / num_layers
    if highlight is not None:
        x0 = left + round(highlight * slot)
        draw.rectangle([x0, top, left + round((highlight + 1) * slot) - 1, axis_y - 1], fill=(238, 238, 250))
    for tick in _ticks(y_max, steps=(0.5, 1.0, 2.0, 5.0)):
        y = axis_y - round(tick / y_max * plot_h)
        draw.line([(left - 3, y), (width - right, y)], fill=GRID)
        draw.text((2, y - 6), f"{tick:g}", fill=TEXT, font=small)
    bar_w = max(2, math.floor(slot * 0.8 / len(names)))
    for layer in range(num_layers):
        x0 = left + round(layer * slot + (slot - bar_w * len(names)) / 2)
        for s, color in enumerate(SERIES_COLORS[:len(names)]):
            bar_h = round(values[s, layer] / y_max * plot_h)
            if bar_h > 0:
                draw.rectangle([x0 + s * bar_w, axis_y - bar_h, x0 + (s + 1) * bar_w - 2, axis_y - 1], fill=color)
        label = f"layer {layer}" if small.getlength(f"layer {layer}") < slot - 4 else str(layer)
        draw.text((left + (layer + 0.5) * slot - small.getlength(label) / 2, axis_y + 4), label,
                  fill=TEXT if layer == highlight else MUTED, font=small)
    draw.line([(left, axis_y), (width - right, axis_y)], fill=TEXT)
    return chart


# ----------------------------------------------------------------------------------------------------------
# Multimodal LM: where each modality's tokens went
# ----------------------------------------------------------------------------------------------------------


def modality_share_chart(shares: dict[str, dict[str, float]], groups: Sequence[str], title: str = "",
                         size: tuple[int, int] = (420, 200)) -> Image.Image:
    """One stacked horizontal bar per modality (``shares[modality][group]``, each row summing to 1): the share of
    that modality's routed slots that went to each expert group (e.g. "m1 intra", "shared"), one colour per
    group with its % written on the segment, and a legend of the groups under the bars."""
    if not shares:
        raise ValueError("shares is empty: no modality has routed tokens")
    for modality, per_group in shares.items():
        values = np.array(list(per_group.values()), dtype=np.float64)
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or abs(values.sum() - 1) > 1e-6:
            raise ValueError(f"the shares of {modality!r} must be >= 0 and sum to 1, got {per_group}")
    groups = list(groups)
    colors = expert_colors(len(groups))
    width, height = size
    chart = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(chart)
    small, font = _font(11), _font(13)
    left, right, top = 56, 10, 26 if title else 8
    if title:
        draw.text((8, 5), title, fill=TEXT, font=font)
    legend_h = 18 * math.ceil(len(groups) / 3)
    row_h = min(34, (height - top - legend_h - 8) // len(shares))
    plot_w = width - left - right
    for r, (modality, per_group) in enumerate(shares.items()):
        y0 = top + r * row_h + 4
        draw.text((6, y0 + row_h / 2 - 9), modality, fill=TEXT, font=small)
        x = float(left)
        for g, group in enumerate(groups):
            share = per_group.get(group, 0.0)
            if share <= 0:
                continue
            x1 = x + share * plot_w
            draw.rectangle([round(x), y0, max(round(x), round(x1) - 1), y0 + row_h - 8], fill=tuple(int(c) for c in colors[g]))
            label = f"{share * 100:.0f}%"
            if x1 - x > small.getlength(label) + 4:
                draw.text((x + (x1 - x) / 2 - small.getlength(label) / 2, y0 + (row_h - 8) / 2 - 7), label,
                          fill=BACKGROUND, font=small)
            x = x1
    legend_y = height - legend_h
    for g, group in enumerate(groups):
        lx = 8 + (g % 3) * (width - 16) / 3
        ly = legend_y + 18 * (g // 3)
        draw.rectangle([lx, ly + 3, lx + 10, ly + 13], fill=tuple(int(c) for c in colors[g]))
        draw.text((lx + 14, ly + 1), group, fill=TEXT, font=small)
    return chart
