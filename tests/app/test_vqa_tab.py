"""The scene question tab: its answer is the pipeline's on the same generated scene (or upload), the routing
picture and the coloured words are the pipeline's routing for that layer, and bad input is a readable gr.Error."""

import re

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from moezoo.app.demo import TABS, SceneQA, build_demo, generated_scene
from moezoo.app.pictures import expert_colors
from moezoo.training.datasets.scenes import render_scene, sample_scene, scene_rng

VQA_TAB = next(tab for tab in TABS if tab.api_name == "scene_qa")
QUESTION = "what shape is the red object?"


@pytest.fixture(scope="module")
def app(tiny_loader):
    demo = build_demo([VQA_TAB], load_pipeline=tiny_loader, cache_examples=False)
    return demo.tab_apps["scene_qa"]


def test_generated_scene_is_the_test_splits():
    expected = render_scene(sample_scene(scene_rng("test", 0, 4), "test"), 64)
    assert np.array_equal(np.asarray(generated_scene(4, 64)), expected)


def test_answer_and_routing_are_the_pipelines(app):
    answer, picture, chart, notes = app.run(3, None, QUESTION, 1)
    out = app.pipe(images=generated_scene(3, 64), prompt=QUESTION, return_routing=True)
    assert answer == out.text[0]
    assert isinstance(picture, Image.Image) and isinstance(chart, Image.Image)
    # every prompt word is drawn in the colour of its first-choice expert in layer 1
    experts = out.routing[1][0]
    text_rows = np.flatnonzero(out.modality[0] == 0)
    colours = expert_colors(app.layers[1].num_experts)
    spans = re.findall(r'background: rgb\((\d+),(\d+),(\d+)\)[^>]*>([^<]+)</span>', notes)
    words = QUESTION.rstrip("?").split()
    assert [s[3] for s in spans[: len(words)]] == words
    for (r, g, b, _), row in zip(spans, text_rows[1:]):
        assert (int(r), int(g), int(b)) == tuple(int(c) for c in colours[experts[row, 0]])
    shares = out.modality_shares(1)
    for modality, per_group in shares.items():
        for group, share in per_group.items():
            assert f"{group} {share:.0%}" in notes


def test_upload_is_answered_at_the_models_size(app, tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.asarray(generated_scene(5, 64)).repeat(2, 0).repeat(2, 1)).save(path)
    answer, *_ , notes = app.run(0, str(path), QUESTION, 0)
    assert "read at the model's 64x64 pixels" in notes
    assert answer == app.pipe(images=Image.open(path).convert("RGB"), prompt=QUESTION).text[0]


@pytest.mark.parametrize("scene,question,message", [
    (0, "   ", "The prompt is empty"),
    (-1, QUESTION, "Scene must be a whole number"),
    (1.5, QUESTION, "Scene must be a whole number"),
    (0, "what " * 40, "at most"),
])
def test_bad_input_is_a_readable_error(app, scene, question, message):
    with pytest.raises(gr.Error, match=message):
        app.run(scene, None, question, 0)
