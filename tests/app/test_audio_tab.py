"""The text -> audio tab: the clip it plays is the pipeline's for the same seed, the bars under the spectrogram
are the pipeline's experts per frame (one column block per frame, aligned with the spectrogram's), the
speech/music reference means are computed once per app, and bad input is a readable gr.Error."""

import warnings

import gradio as gr
import numpy as np
import pytest
import soundfile
import torch

from moezoo.app.demo import TABS, TextToAudio, build_demo
from moezoo.app.pictures import (
    AXIS_LEFT,
    EXPERT_ROW_PX,
    EXPERTS_BAR_COLOR,
    MEL_ROW_PX,
    SERIES_COLORS,
    SPECTROGRAM_ANCHORS,
    SPECTROGRAM_WIDTH,
    mean_experts_chart,
    spectrogram_with_experts,
)
from moezoo.pipelines import AudioPipeline
from moezoo.training.datasets.audio import parse_audio_caption

AUDIO_TAB = next(tab for tab in TABS if tab.api_name == "audio")
GUIDANCE, TEMPERATURE, TOP_K = 3.0, 1.0, 8
# export_to_wav writes 16-bit PCM: a sample read back is off by at most one quantisation step (1/32768) plus
# the 32767-vs-32768 full-scale difference of writing and reading (at most another step at full scale).
PCM16_ATOL = 2 / 32768


@pytest.fixture(scope="module")
def demo(tiny_loader):
    return build_demo([AUDIO_TAB], load_pipeline=tiny_loader, cache_examples=False)


@pytest.fixture(scope="module")
def app(demo):
    return demo.tab_apps["audio"]


def quietly(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args)
    return result, [str(w.message) for w in caught]


def direct(pipe, prompt, seed, **options):
    """The pipeline called as a user would, with the tab's sampling settings."""
    settings = dict(guidance_scale=GUIDANCE, temperature=TEMPERATURE, top_k=TOP_K, **options)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), return_routing=True, **settings)


def bar_runs(picture) -> tuple[list[tuple[int, int]], list[int]]:
    """The bars under the spectrogram read back from the pixels: the x range [start, end) of every bar along
    the row they stand on, and each bar's height in experts (its bar-coloured pixels / EXPERT_ROW_PX)."""
    is_bar = (np.asarray(picture) == EXPERTS_BAR_COLOR).all(-1)
    base = np.nonzero(is_bar.any(1))[0].max()
    edges = np.diff(np.concatenate([[0], is_bar[base].astype(np.int8), [0]]))
    runs = list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))
    heights = [int(is_bar[:, start].sum()) for start, _ in runs]
    assert all(h % EXPERT_ROW_PX == 0 for h in heights)
    return runs, [h // EXPERT_ROW_PX for h in heights]


# ------------------------------------------------------------------------------------------------ the tab


def test_the_tab_is_in_the_demo_with_its_endpoints(demo, app):
    assert isinstance(app, TextToAudio) and list(demo.tab_apps) == ["audio"]
    listeners = {fn.api_name: fn for fn in demo.fns.values()}
    assert listeners["audio"].concurrency_id == listeners["audio_layer"].concurrency_id == "unimoe_audio_tiny"
    player = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "audio-output")
    assert isinstance(player, gr.Audio)
    layer = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "audio-layer")
    assert [value for _, value in layer.choices] == [0, 1] and layer.preprocess("1") == 1


def test_missing_weights_show_the_tab_as_unavailable(tiny_loader):
    def loader(tab):
        if tab.model == "unimoe_audio_tiny":
            raise FileNotFoundError("unimoe_audio_tiny.safetensors: not found in zoo/weights")
        return tiny_loader(tab)

    demo = build_demo([TABS[0], AUDIO_TAB], load_pipeline=loader, cache_examples=False)
    assert list(demo.tab_apps) == ["digits"]
    texts = [block.value or "" for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("not available" in t and "`unimoe_audio_tiny`" in t and "> FileNotFoundError: unimoe_audio_tiny" in t
               for t in texts)


def test_the_player_gets_the_pipelines_clip_at_its_rate(app, tiny_pipelines):
    (path, _picture, _chart, notes), _ = quietly(app.run, "the word seven", 3, GUIDANCE, TEMPERATURE, TOP_K, 1)
    reference = direct(tiny_pipelines["unimoe_audio_tiny"], "the word seven", 3)
    samples, rate = soundfile.read(path, dtype="float32")
    assert path.endswith(".wav") and rate == reference.sampling_rate == 16_000
    assert samples.shape == reference.audios[0].shape
    np.testing.assert_allclose(samples, reference.audios[0], rtol=0, atol=PCM16_ATOL)
    assert "Computed in" in notes


@pytest.mark.parametrize("layer", [0, 1])
def test_the_bars_are_the_experts_each_frame_used_one_block_per_frame(app, tiny_pipelines, layer):
    (_path, picture, _chart, notes), _ = quietly(app.run, "a plucked C4 note", 4, GUIDANCE, TEMPERATURE, TOP_K, layer)
    expected = direct(tiny_pipelines["unimoe_audio_tiny"], "a plucked C4 note", 4).experts_per_token[layer][0]
    frames = expected.size
    assert len(set(expected.tolist())) > 1  # the tiny model's sharpened gates vary the count: frames are told apart
    runs, counts = bar_runs(picture)
    assert counts == expected.tolist()
    frame_px = SPECTROGRAM_WIDTH // frames
    assert [start for start, _ in runs] == [AXIS_LEFT + t * frame_px for t in range(frames)]
    assert all(end - start == frame_px - 1 for start, end in runs)  # a white column between neighbours
    # The spectrogram above: 80 mel bands of MEL_ROW_PX pixels over the same columns.
    spectrogram = np.asarray(picture)[: 80 * MEL_ROW_PX, AXIS_LEFT: AXIS_LEFT + frames * frame_px]
    assert not (spectrogram == 255).all(-1).any()  # painted throughout; white right after the last frame
    assert tuple(np.asarray(picture)[0, AXIS_LEFT + frames * frame_px]) == (255,) * 3
    # The notes: the mean and the share of frames by count, from the pipeline's counts.
    assert f"**Layer {layer}**" in notes and f"Mean **{expected.mean():.2f} experts per frame**" in notes
    for k in range(expected.min(), expected.max() + 1):
        assert f"{k}: {np.mean(expected == k):.0%}" in notes
    assert "null experts included" in notes


def test_another_layer_redraws_without_generating_again(app, monkeypatch):
    calls = []
    original = app.compute
    monkeypatch.setattr(app, "compute", lambda *a: calls.append(a) or original(*a))
    first, _ = quietly(app.run, "the word yes", 21, GUIDANCE, TEMPERATURE, TOP_K, 0)
    second, _ = quietly(app.run, "the word yes", 21, GUIDANCE, TEMPERATURE, TOP_K, "1")
    assert len(calls) == 1 and first[0] == second[0]
    assert "**Layer 0**" in first[3] and "**Layer 1**" in second[3]


def test_top_k_zero_samples_among_all_codes(app):
    num_codes = app.pipe.model.config.codebook_size
    (all_codes, *_), _ = quietly(app.run, "the word no", 8, GUIDANCE, TEMPERATURE, 0, 0)
    (every_code, *_), _ = quietly(app.run, "the word no", 8, GUIDANCE, TEMPERATURE, num_codes, 0)
    assert np.array_equal(soundfile.read(all_codes)[0], soundfile.read(every_code)[0])


def test_a_prompt_outside_the_caption_forms_runs_with_a_note(app):
    (path, _picture, _chart, notes), caught = quietly(app.run, "word the seven", 0, GUIDANCE, TEMPERATURE, TOP_K, 0)
    assert "not one of the captions the model trained on" in notes
    assert any("not one of the captions" in message for message in caught)
    assert soundfile.read(path)[0].size > 0


@pytest.mark.parametrize("args, message", [
    (("", 0, GUIDANCE, TEMPERATURE, TOP_K, 0), "The prompt is empty: say what to hear, e.g. “the word seven”"),
    (("  ", 0, GUIDANCE, TEMPERATURE, TOP_K, 0), "The prompt is empty"),
    (("!!", 0, GUIDANCE, TEMPERATURE, TOP_K, 0), "The prompt has no words"),
    (("the word banana", 0, GUIDANCE, TEMPERATURE, TOP_K, 0),
     "Unknown word 'banana': this model knows only a, a#3, a#4, a3,"),
    (("a banjo G4 note", 0, GUIDANCE, TEMPERATURE, TOP_K, 0), "Unknown word 'banjo'.*yes, zero \\(prompts like"),
    (("the word " + "go " * 7, 0, GUIDANCE, TEMPERATURE, TOP_K, 0),
     "The prompt has 9 words; this model reads at most 8"),
    (("the word seven", -1, GUIDANCE, TEMPERATURE, TOP_K, 0), "Seed must be a whole number from 0"),
    (("the word seven", 1.5, GUIDANCE, TEMPERATURE, TOP_K, 0), "Seed must be a whole number"),
    (("the word seven", None, GUIDANCE, TEMPERATURE, TOP_K, 0), "Seed must be a whole number"),
    (("the word seven", 0, -1.0, TEMPERATURE, TOP_K, 0), "Guidance must be a number from 0 to 15"),
    (("the word seven", 0, GUIDANCE, 2.5, TOP_K, 0), "Temperature must be a number from 0 to 2 \\(0 = always"),
    (("the word seven", 0, GUIDANCE, float("nan"), TOP_K, 0), "Temperature must be a number"),
    (("the word seven", 0, GUIDANCE, TEMPERATURE, 17, 0), "Top-k must be a whole number from 0 to 16 \\(0 = sample"),
    (("the word seven", 0, GUIDANCE, TEMPERATURE, 2.5, 0), "Top-k must be a whole number"),
    (("the word seven", 0, GUIDANCE, TEMPERATURE, TOP_K, 2), "MoE layer must be a whole number from 0 to 1"),
])
def test_bad_inputs_raise_readable_errors(app, args, message):
    with pytest.raises(gr.Error, match=message):
        app.run(*args)


# ------------------------------------------------------------------------------------------------ references


def test_reference_prompts_are_captions_of_their_domain():
    for domain, prompts in TextToAudio.reference_prompts.items():
        assert len(prompts) >= 3
        assert all(parse_audio_caption(prompt)["domain"] == domain for prompt in prompts)


def test_reference_means_are_computed_once_per_app(make_audio_pipeline, monkeypatch):
    pipe = make_audio_pipeline()
    pipe.set_progress_bar_config(disable=True)
    app = TextToAudio(AUDIO_TAB, pipe)
    prompts_called = []
    original = AudioPipeline.__call__
    monkeypatch.setattr(AudioPipeline, "__call__",
                        lambda self, prompt, **kw: prompts_called.append(prompt) or original(self, prompt, **kw))
    (_, _, chart, notes), _ = quietly(app.run, "the word go", 1, GUIDANCE, TEMPERATURE, TOP_K, 0)
    quietly(app.run, "the word go", 2, GUIDANCE, TEMPERATURE, TOP_K, 1)
    quietly(app.run, "the word go", 2, GUIDANCE, TEMPERATURE, TOP_K, 0)  # memo: no generation at all
    speech, music = (list(prompts) for prompts in TextToAudio.reference_prompts.values())
    assert prompts_called == ["the word go", speech, music, "the word go"]
    assert chart.size == (420, 260) and "computed once for this app (at this run" in notes
    # The cached means: every layer's mean over every frame of every prompt, from a direct call with the
    # documented seeds and settings.
    means, seconds = app.reference_means()
    assert seconds == 0.0 and list(means) == ["speech prompts", "music prompts"]
    for name, prompts in (("speech prompts", speech), ("music prompts", music)):
        out = original(pipe, prompts, guidance_scale=AUDIO_TAB.guidance, temperature=AudioPipeline.DEFAULT_TEMPERATURE,
                       top_k=AudioPipeline.DEFAULT_TOP_K,
                       generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))], return_routing=True)
        by_hand = [sum(int(c) for row in counts for c in row) / counts.size for counts in out.experts_per_token]
        assert means[name].tolist() == pytest.approx(by_hand, rel=0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ pictures


def test_spectrogram_and_bars_share_the_time_axis():
    """One loud frame (t = 5) and one loud band (band 0): the loud columns of the spectrogram are exactly frame
    5's bar block, the loud rows are the bottom ones, and the colours follow the stated scale."""
    frames, bands = 13, 80
    level_db = np.full((bands, frames), -100.0)
    level_db[:, 5] = -40.0  # 40 dB under the loudest: halfway up the 80 dB scale
    level_db[0, 5] = 0.0
    experts = np.ones(frames, dtype=np.int64)
    experts[5] = 3
    picture = spectrogram_with_experts(level_db, experts, max_experts=5, frame_rate=62.5, max_hz=8000)
    spectrogram = np.asarray(picture).astype(np.int64)[: bands * MEL_ROW_PX]
    # halfway up the scale: between anchors 2 and 3 of six evenly spaced ones, halfway
    halfway = np.round((SPECTROGRAM_ANCHORS[2] + SPECTROGRAM_ANCHORS[3]) / 2)
    loud = (spectrogram == halfway).all(-1) | (spectrogram == SPECTROGRAM_ANCHORS[-1]).all(-1)
    loud_columns = np.nonzero(loud.any(0))[0]
    runs, counts = bar_runs(picture)
    assert counts == experts.tolist()
    start, end = runs[5]
    frame_px = SPECTROGRAM_WIDTH // frames
    assert loud_columns.tolist() == list(range(start, start + frame_px)) and end == start + frame_px - 1
    column = spectrogram[:, start]
    assert (column[-MEL_ROW_PX:] == SPECTROGRAM_ANCHORS[-1]).all()  # band 0, at the bottom: the loudest anchor
    assert (column[:-MEL_ROW_PX] == halfway).all()
    assert (spectrogram[:, start - 1] == SPECTROGRAM_ANCHORS[0]).all()  # 100 dB down: the quietest anchor


def test_spectrogram_picture_refuses_mismatched_input():
    with pytest.raises(ValueError, match="one count per frame \\(4\\)"):
        spectrogram_with_experts(np.zeros((80, 4)), np.ones(3), 2, 62.5)
    with pytest.raises(ValueError, match="expert counts must be in \\[0, 2\\]"):
        spectrogram_with_experts(np.zeros((80, 4)), np.array([1, 3, 1, 1]), 2, 62.5)


def test_mean_chart_bars_are_proportional_to_the_means():
    series = {"this prompt": [1.0, 2.0, 4.0], "speech prompts": [2.0, 2.0, 2.0], "music prompts": [3.0, 1.0, 0.5]}
    chart = np.asarray(mean_experts_chart(series, highlight=1))
    heights = {}
    for name, color in zip(series, SERIES_COLORS):
        is_series = (chart == color).all(-1)
        base = np.nonzero(is_series.any(1))[0].max()  # the row the bars stand on (the legend swatch is higher)
        columns = np.nonzero(is_series[base])[0]
        groups = np.split(columns, np.nonzero(np.diff(columns) > 1)[0] + 1)  # one bar per layer
        # a bar's height: its colour's unbroken run upwards from the base
        heights[name] = [int(np.argmin(is_series[base::-1, group[0]])) for group in groups]
    per_expert = heights["this prompt"][2] / 4.0  # the tallest bar: its rounding matters least
    for name, values in series.items():
        assert len(heights[name]) == 3
        # heights are whole pixels: each within half a pixel of value * per_expert, plus per_expert's own error
        assert heights[name] == pytest.approx([v * per_expert for v in values], abs=1.0)
    with pytest.raises(ValueError, match="one value per layer"):
        mean_experts_chart({"a": [1.0], "b": [1.0, 2.0]})
