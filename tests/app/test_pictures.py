"""Routing pictures: every cell shows its expert's colour (shaded by the image's brightness, stated formula), the
legend lists every expert, clips get one panel per frame, and the load chart's bars are proportional to the
shares — all checked pixel by pixel against hand-computed values."""

import numpy as np
import pytest
from PIL import Image

from moezoo.app.pictures import (
    MAP_SHADE,
    expand_map,
    expert_colors,
    expert_labels,
    expert_shares,
    load_chart,
    routing_map_picture,
)


def test_colours_are_distinct_and_special_experts_are_grey():
    for n in (2, 4, 8, 16):
        colors = expert_colors(n)
        assert colors.shape == (n, 3) and colors.dtype == np.uint8
        assert len({tuple(c) for c in colors}) == n
    colors = expert_colors(6, num_experts=4)
    for grey in colors[4:]:
        assert grey[0] == grey[1] == grey[2]
    assert len({tuple(c) for c in colors}) == 6


def test_expand_map_rounds_cells_up_like_patch_grids():
    # 10 pixels over 3 cells: cells are ceil(10 / 3) = 4 pixels, the last one cut to 2.
    map_hw = np.array([[0, 1, 2]])
    expanded = expand_map(map_hw, height=3, width=10)
    for x in range(10):
        assert expanded[0, x] == min(x // 4, 2)
    assert expanded.shape == (3, 10)


def test_map_without_image_shows_each_cells_colour():
    map_hw = np.array([[0, 1, 2], [3, 3, 0]])
    picture = np.asarray(routing_map_picture(map_hw, num_experts=4))
    colors = expert_colors(4)
    # 2x3 cells, enlarged by 256 // 3 = 85 px per cell; sample each cell's centre.
    cell = 256 // 3
    for i in range(2):
        for j in range(3):
            y, x = i * cell + cell // 2, j * cell + cell // 2
            assert tuple(picture[y, x]) == tuple(colors[map_hw[i, j]])


def test_map_over_image_keeps_the_hue_and_shows_the_image_as_brightness():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    map_hw = rng.integers(0, 8, (8, 8))
    picture = np.asarray(routing_map_picture(map_hw, num_experts=8, image=image))
    colors = expert_colors(8).astype(np.float64)
    scale = 256 // 16  # each image pixel is a 16x16 block of the picture
    for y in range(16):
        for x in range(16):
            value = image[y, x].max() / 255.0
            expected = np.round(colors[map_hw[y // 2, x // 2]] * (1 - MAP_SHADE + MAP_SHADE * value))
            # the middle of the pixel's block (grid lines only run along cell borders)
            assert tuple(picture[y * scale + scale // 2, x * scale + scale // 2]) == tuple(expected.astype(np.uint8))


def test_legend_has_every_expert_even_unused_ones():
    map_hw = np.zeros((4, 4), dtype=np.int64)  # only expert 0 is used
    picture = np.asarray(routing_map_picture(map_hw, num_experts=6, title="layer 0"))
    legend = picture[256:]  # below the 256 px map
    for color in expert_colors(6):
        assert (legend == color).all(-1).any(), f"no swatch of colour {color}"


def test_clip_gets_one_panel_per_frame():
    frames = np.stack([np.full((4, 4), f % 4) for f in range(6)])  # frame f routed wholly to expert f % 4
    picture = np.asarray(routing_map_picture(frames, num_experts=4, columns=3))
    colors = expert_colors(4)
    panel = 128 // 4 * 4  # half-size panels: 4-cell frames enlarged to 128 px
    gap = 4
    for f in range(6):
        row, col = divmod(f, 3)
        first_cell = picture[row * (panel + gap) + 16, col * (panel + gap) + 16]  # cells are 32 px
        last_cell = picture[row * (panel + gap) + panel - 16, col * (panel + gap) + panel - 16]
        assert tuple(first_cell) == tuple(last_cell) == tuple(colors[f % 4])


def test_map_checks_its_input():
    with pytest.raises(ValueError, match=r"ids must be in \[0, 4\)"):
        routing_map_picture(np.array([[0, 4]]), num_experts=4)
    with pytest.raises(ValueError, match="must be \\[h, w\\] or \\[F, h, w\\]"):
        routing_map_picture(np.zeros(5, dtype=int), num_experts=4)
    with pytest.raises(ValueError, match="got 3 labels for 4"):
        routing_map_picture(np.zeros((2, 2), dtype=int), num_experts=4, labels=["a", "b", "c"])


def test_shares_count_first_choices():
    map_ = np.array([[0, 0], [1, 3]])
    assert expert_shares(map_, 4).tolist() == [0.5, 0.25, 0.0, 0.25]
    clip = np.array([[[2]], [[2]], [[1]], [[2]]])  # [F=4, 1, 1]
    assert expert_shares(clip, 3).tolist() == [0.0, 0.25, 0.75]


def test_chart_bars_are_proportional_to_shares():
    shares = np.array([0.4, 0.1, 0.0, 0.3, 0.2])
    chart = np.asarray(load_chart(shares, title="load"))
    colors = expert_colors(5)
    areas = np.array([(chart == c).all(-1).sum() for c in colors], dtype=np.float64)
    assert areas[2] == 0  # an unused expert has no bar
    # all bars have the same width, so areas are proportional to heights; heights are rounded to pixels
    heights = areas / areas[0]
    assert heights == pytest.approx(shares / shares[0], abs=0.02)


def test_chart_labels_and_checks():
    assert expert_labels(3, 1, ["vis", "vis", "ir"]) == ["e0 vis", "e1 vis", "e2 ir", "special 0"]
    with pytest.raises(ValueError, match="non-empty"):
        load_chart([])
    with pytest.raises(ValueError, match=">= 0"):
        load_chart([0.5, -0.1])
    chart = load_chart([0.25, 0.75], size=(300, 200))
    assert isinstance(chart, Image.Image) and chart.size == (300, 200)
