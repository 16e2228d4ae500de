"""The audio metrics (training/audio_metrics.py) against hand computations and per-frame loops, the word judge's
shapes and cache, and bench/audio_quality.py's command line. No judge is trained here."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import fp_tolerance

from moezoo.encoders.audio import CLIP_SAMPLES, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, num_frames, num_samples
from moezoo.training.audio_metrics import (
    CENTS_TOLERANCE,
    SILENCE_BELOW_PEAK_DB,
    SILENCE_FLOOR_DB,
    WordJudge,
    cents_error,
    frame_energy_db,
    heard_pitch_classes,
    median_f0,
    pitch_class_energy,
    pitch_class_f1,
    silent_frames,
    teacher_forced_routing,
)
from moezoo.training.datasets.audio import (
    TIMBRES,
    WORDS,
    midi_to_hz,
    music_sounds,
    parse_audio_caption,
    render_sound,
)

_spec = importlib.util.spec_from_file_location(
    "audio_quality", Path(__file__).resolve().parents[2] / "bench" / "audio_quality.py")
audio_quality = importlib.util.module_from_spec(_spec)
sys.modules["audio_quality"] = audio_quality  # its dataclasses look their module up while it executes
_spec.loader.exec_module(audio_quality)

# YIN refines the lag with a parabola through d at three lags. On a clean tone the vertex lands within a small
# fraction of a sample of the true period: measured 0.02 cents up to B4 (a 32-sample period), 0.3 at C6 (15
# samples), where the parabola's bias grows with the curvature; 1 cent bounds that without accepting a wrong pitch.
YIN_CENTS = 1.0


def sine(frequency: float, seconds: float = 1.0, amplitude: float = 0.8) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return amplitude * np.sin(2 * np.pi * frequency * t)


# ------------------------------------------------------------------------------------------------ pitch


@pytest.mark.parametrize("midi", [48, 57, 60, 65.5, 71, 84])
def test_a_sine_reads_at_its_own_pitch(midi):
    frequency = midi_to_hz(midi)
    assert abs(cents_error(median_f0(sine(frequency)), frequency)) < YIN_CENTS


def test_a_wrong_note_is_far_off():
    c4 = midi_to_hz(60)
    assert cents_error(median_f0(sine(midi_to_hz(61))), c4) == pytest.approx(100, abs=YIN_CENTS)
    assert cents_error(median_f0(sine(c4 / 2)), c4) == pytest.approx(-1200, abs=YIN_CENTS)
    assert cents_error(median_f0(sine(midi_to_hz(60.6))), c4) > CENTS_TOLERANCE


@pytest.mark.parametrize("timbre", TIMBRES)
def test_rendered_notes_read_within_a_few_cents(timbre):
    rng = np.random.RandomState(0)
    for midi in (48, 59, 71):
        audio = render_sound(music_sounds()[midi - 48], timbre, rng)
        assert abs(cents_error(median_f0(audio), midi_to_hz(midi))) < 5.0  # measured at most 2.7 on 192 renders


def test_silence_and_noise_have_no_pitch():
    assert math.isnan(median_f0(np.zeros(CLIP_SAMPLES)))
    noise = np.random.RandomState(0).standard_normal(CLIP_SAMPLES) * 0.3
    assert math.isnan(median_f0(noise))
    assert math.isnan(cents_error(math.nan, 440.0))


def test_cents_error_formula_and_bad_target():
    assert cents_error(880.0, 440.0) == pytest.approx(1200.0)
    assert cents_error(440.0 * 2 ** (25 / 1200), 440.0) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="positive frequency"):
        cents_error(440.0, 0.0)


def test_a_clip_shorter_than_a_pitch_frame_is_refused():
    with pytest.raises(ValueError, match="shorter than one pitch frame"):
        median_f0(np.ones(100))


# ------------------------------------------------------------------------------------------------ chords


def test_a_sine_at_a4_is_pitch_class_a():
    chroma = pitch_class_energy(sine(440.0))
    assert chroma.argmax() == 9 and chroma[9] == 1.0
    assert heard_pitch_classes(sine(440.0)) == {9}


def test_three_sines_of_a_c_major_triad_are_heard_as_c_e_g():
    triad = sum(sine(midi_to_hz(m), amplitude=0.3) for m in (60, 64, 67))
    assert heard_pitch_classes(triad) == {0, 4, 7}
    assert pitch_class_f1(heard_pitch_classes(triad), (60, 64, 67)) == 1.0


@pytest.mark.parametrize("timbre", TIMBRES)
def test_rendered_triads_score_f1_one(timbre):
    rng = np.random.RandomState(1)
    for chord in [s for s in music_sounds() if s.kind == "chord"]:
        assert pitch_class_f1(heard_pitch_classes(render_sound(chord, timbre, rng)), chord.midi) == 1.0, chord


def test_pitch_class_f1_by_hand():
    assert pitch_class_f1({0, 4, 9}, {0, 4, 7}) == pytest.approx(2 * 2 / (3 + 3))
    assert pitch_class_f1({0, 4, 7, 11}, {60, 64, 67}) == pytest.approx(2 * 3 / (4 + 3))
    assert pitch_class_f1(set(), {0, 4, 7}) == 0.0
    assert heard_pitch_classes(np.zeros(CLIP_SAMPLES)) == frozenset()
    with pytest.raises(ValueError, match="no pitch class"):
        pitch_class_f1({0}, set())


# ------------------------------------------------------------------------------------------------ silence


def energy_db_loop(audio: np.ndarray) -> np.ndarray:
    """Frame by frame: the Hann-weighted mean power of the N_FFT samples centred on frame * HOP_LENGTH."""
    window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as torch.hann_window
    energies = []
    for frame in range(1 + len(audio) // HOP_LENGTH):
        total = 0.0
        for n in range(N_FFT):
            i = frame * HOP_LENGTH - N_FFT // 2 + n
            if 0 <= i < len(audio):
                total += (window[n] * audio[i]) ** 2
        energies.append(10 * math.log10(max(total / (window**2).sum(), 1e-12)))
    return np.array(energies)


def test_frame_energy_against_a_per_frame_loop():
    rng = np.random.RandomState(0)
    audio = np.zeros(4000)
    audio[1200:2500] = rng.uniform(-0.5, 0.5, 1300)
    audio[2500:2600] = 1e-4
    expected = energy_db_loop(audio)
    got = frame_energy_db(audio)
    assert got.shape == (num_frames(len(audio)),)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected),
                               **fp_tolerance(torch.float64, N_FFT, scale=100.0))
    threshold = max(expected.max() - SILENCE_BELOW_PEAK_DB, SILENCE_FLOOR_DB)
    np.testing.assert_array_equal(silent_frames(audio), expected < threshold)
    assert silent_frames(audio)[0] and not silent_frames(audio)[7] and silent_frames(audio)[-1]


def test_a_full_scale_sine_is_minus_3_db_and_silence_is_silent():
    energy = frame_energy_db(sine(440.0, amplitude=1.0))
    assert np.abs(energy[4:-4] - 10 * math.log10(0.5)).max() < 0.01  # mean of sin^2 = 1/2, up to window ripple
    assert silent_frames(np.zeros(num_samples(64))).all()
    assert silent_frames(np.full(num_samples(64), 1e-4)).all()  # -80 dBFS: below the floor


# ------------------------------------------------------------------------------------------------ the judge


def test_word_judge_shapes():
    judge = WordJudge(len(WORDS), width=8).eval()
    with torch.no_grad():
        assert judge(torch.zeros(3, CLIP_SAMPLES)).shape == (3, len(WORDS))
        assert judge(torch.zeros(num_samples(64))).shape == (1, len(WORDS))  # a generated clip's length
        assert judge.classify_mel(torch.zeros(2, N_MELS, 40)).shape == (2, len(WORDS))
    assert judge.head.in_features == 2 * 4 * 8  # mean and max of the last 4 x width channels
    with pytest.raises(ValueError, match=r"mel must be \[B, 80, T >= 8\]"):
        judge.classify_mel(torch.zeros(2, 40, 65))
    with pytest.raises(ValueError, match="num_words >= 2"):
        WordJudge(1)


def test_the_cached_judge_loads_back_and_refuses_other_settings(tmp_path):
    torch.manual_seed(0)
    judge = WordJudge(len(WORDS), width=4).eval()
    settings = {**audio_quality.judge_settings(epochs=3, seed=0, data_seed=0), "width": 4}
    path = audio_quality.judge_cache_path(tmp_path, settings)
    audio_quality.save_judge(judge, path, settings)
    clip = torch.from_numpy(sine(300.0, seconds=CLIP_SAMPLES / SAMPLE_RATE)).float()[None]
    with torch.no_grad():
        torch.testing.assert_close(audio_quality.load_judge(path, settings)(clip), judge(clip), rtol=0, atol=0)
    other = {**settings, "epochs": 4}
    assert audio_quality.judge_cache_path(tmp_path, other) != path
    with pytest.raises(ValueError, match="trained with"):
        audio_quality.load_judge(path, other)


def test_augmentation_shifts_with_zeros_and_scales_by_the_drawn_gain():
    length = 2000
    audio = torch.arange(1, length + 1, dtype=torch.float32)[None].repeat(16, 1)  # no zero sample of its own
    recipe = {**audio_quality.JUDGE_RECIPE, "max_shift_ms": 10, "gain_db": 6.0}  # 10 ms = 160 samples
    out = audio_quality.augmented(audio, recipe, torch.Generator().manual_seed(0))
    shifts = []
    for row in out:
        nonzero = torch.nonzero(row)[:, 0]
        if row[0] == 0:  # moved later by `first` samples
            shift = int(nonzero[0])
            gain = row[shift] / audio[0, 0]
            expected = torch.cat([torch.zeros(shift), audio[0, : length - shift]]) * gain
        else:  # moved earlier: the last `shift` samples are zeros
            shift = -(length - 1 - int(nonzero[-1]))
            gain = row[0] / audio[0, -shift]
            expected = torch.cat([audio[0, -shift:], torch.zeros(-shift)]) * gain
        shifts.append(shift)
        torch.testing.assert_close(row, expected, **fp_tolerance(torch.float32, 1, scale=float(length)))
        assert 10 ** (-6 / 20) * (1 - 1e-6) <= float(gain) <= 10 ** (6 / 20) * (1 + 1e-6)
    assert all(abs(s) <= 160 for s in shifts) and len(set(shifts)) > 1


# ------------------------------------------------------------------------------------------------ routing


def sharp_test_model(seed: int = 0):
    """The CI-sized UniMoE-Audio with its gates scaled up, so tokens use from 1 to all 5 dynamic experts
    (at initialisation every token uses 4)."""
    from moezoo.zoo import create_model

    torch.manual_seed(seed)
    model = create_model("test_unimoe_audio").eval()
    with torch.no_grad():
        for block in model.blocks:
            block.moe.gate.weight.mul_(40)
    return model


def test_teacher_forced_counts_match_generation_step_by_step():
    model = sharp_test_model()
    text_ids = model.tokenize(["the word a", "a note", "word"])
    codes, per_layer = model.generate(text_ids, 12, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                                      return_routing=True)
    layers = teacher_forced_routing(model, text_ids, codes)
    assert len(layers) == len(per_layer) == model.config.depth
    for forced, stepped in zip(layers, per_layer):
        assert forced["experts"].shape == forced["null"].shape == (3, 12)
        torch.testing.assert_close(forced["experts"], stepped[:, :12], rtol=0, atol=0)
    used = torch.cat([layer["experts"].flatten() for layer in layers])
    assert used.min() < used.max()  # the comparison covers tokens of different capacity


def test_teacher_forced_null_use_by_the_top_p_formula():
    """Every token's FFN input made the same vector of ones (norm2: weight 0, bias 1), so its gate logits are the
    gate rows' sums, set by hand; the chosen set then follows from the top-p rule on those logits."""
    model = sharp_test_model()
    cfg = model.config
    routed_logits = np.arange(cfg.num_experts) * 0.5
    for null_logit in (10.0, -10.0, 1.2):
        with torch.no_grad():
            for block in model.blocks:
                block.norm2.weight.zero_()
                block.norm2.bias.fill_(1.0)
                rows = np.concatenate([routed_logits, [null_logit], np.zeros(cfg.num_shared_experts)])
                block.moe.gate.weight.copy_(torch.from_numpy(rows)[:, None].float().expand(-1, cfg.dim) / cfg.dim)
        logits = np.concatenate([routed_logits, [null_logit]])
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        order = np.argsort(-probs)
        k = int((np.cumsum(probs[order]) < cfg.top_p).sum()) + 1
        null_chosen = cfg.num_experts in order[:k]
        codes = torch.randint(cfg.codebook_size, (2, cfg.num_codebooks, 5), generator=torch.Generator().manual_seed(1))
        for layer in teacher_forced_routing(model, model.tokenize(["a note", "the word"]), codes):
            assert (layer["experts"] == k).all() and (layer["null"] == null_chosen).all(), (null_logit, k)
    assert k == 3 and null_chosen  # the last case: the null expert is second of the three


def test_routing_summary_by_hand():
    prompts = [audio_quality.Prompt("the word one", "speech", 0), audio_quality.Prompt("a sine C4 note", "music", 0)]
    experts = np.array([[[1, 2, 3], [4, 4, 4]], [[2, 2, 2], [1, 3, 5]]])  # [layer, clip, frame]
    null = np.array([[[1, 0, 0], [0, 0, 1]], [[0, 0, 0], [1, 1, 0]]], bool)
    silent = np.array([[1, 0, 0], [0, 0, 1]], bool)
    generated = {"routing": {"experts": experts, "forced_experts": experts, "null": null}, "silent": silent}
    summary = audio_quality.routing_summary(prompts, generated)
    assert summary["experts_per_token_by_layer"] == {"speech": [2.0, 2.0], "music": [4.0, 3.0]}
    assert summary["experts_per_token"] == {"speech": 2.0, "music": 3.5}
    assert summary["experts_per_token_silent_by_layer"] == [(1 + 4) / 2, (2 + 5) / 2]
    assert summary["null_rate_silent_by_layer"] == [1.0, 0.0]
    assert summary["null_rate_sounding_by_layer"] == [0.0, 0.5]
    assert summary["null_rate_silent"] == 0.5 and summary["null_rate_sounding"] == 0.25
    assert summary["silent_frame_share"] == {"speech": 1 / 3, "music": 1 / 3}
    assert summary["routed_experts_per_token"] == pytest.approx((experts.sum() - null.sum()) / experts.size)
    assert summary["teacher_forced_agreement"] == 1.0
    assert audio_quality.routing_summary(prompts, {"routing": None, "silent": silent}) is None


# ------------------------------------------------------------------------------------------------ the bench


def test_reading_notes_and_chords_counts_unpitched_clips_as_wrong():
    c_major = (60, 64, 67)
    clips = audio_quality.ClipSet(
        speech=[], words=[],
        notes=[sine(midi_to_hz(60)), sine(midi_to_hz(61)), np.zeros(SAMPLE_RATE)], note_midi=[60, 60, 60],
        note_timbres=["sine", "sine", "square"],
        chords=[sum(sine(midi_to_hz(m), amplitude=0.3) for m in c_major), sine(midi_to_hz(60))],
        chord_midi=[c_major, c_major], chord_timbres=["sine", "plucked"])
    result = audio_quality.read_clips(None, clips)
    assert result["notes_within_50_cents"] == pytest.approx(1 / 3)
    assert result["median_abs_cents"] == pytest.approx(100, abs=YIN_CENTS)  # of 0, 100 and no pitch (infinite)
    assert result["unpitched_notes"] == 1
    assert result["notes_within_50_cents_per_timbre"] == {"sine": 0.5, "square": 0.0}
    assert result["chord_f1"] == pytest.approx((1.0 + 2 * 1 / (1 + 3)) / 2)  # C alone: F1 of {C} vs {C, E, G}
    assert "word_accuracy" not in result


def test_the_prompts_are_every_word_and_every_music_caption():
    prompts = audio_quality.generation_prompts(word_seeds=3, music_seeds=2)
    assert len(prompts) == 20 * 3 + 36 * 4 * 2
    asked = [parse_audio_caption(p.text) for p in prompts]
    assert [a["domain"] for a in asked] == [p.domain for p in prompts]
    assert {a["word"] for a in asked if a["domain"] == "speech"} == set(WORDS)
    assert sum(a.get("kind") == "chord" for a in asked) == 12 * 4 * 2
    assert [p.repetition for p in prompts[:40:20]] == [0, 1]


@pytest.mark.parametrize("argv, message", [
    (["ceiling", "--word-seeds", "0"], "--word-seeds must be >= 1"),
    (["ceiling", "--batch", "-2"], "--batch must be >= 1"),
    (["ceiling", "--codebooks", "4", "0"], "--codebooks must be >= 1 each"),
    (["ceiling", "--frames", "0"], "--frames must be >= 1"),
    (["ceiling", "--top-k", "-1"], "--top-k must be >= 0"),
    (["ceiling", "--temperature", "nan"], "--temperature a finite number"),
    (["ceiling", "--guidance", "-1"], "--guidance"),
    (["ceiling", "--compare", "=local-dir:x"], "SOURCE or LABEL=SOURCE"),
    (["ceiling", "--compare", "a=x", "a=y"], "labels must differ"),
    (["ceiling", "--codec", "/no/such/tokenizer.safetensors"], "no such file"),
    (["ceiling", "--vocoder", "/no/such/vocoder.safetensors"], "no such file"),
    (["judge"], "invalid choice"),
])
def test_bad_arguments_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        audio_quality.parse_args(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_arguments_parse_into_model_sources():
    args = audio_quality.parse_args(["generated", "--compare", "moe=local-dir:/a", "unimoe_audio_tiny", "--top-k", "0"])
    assert audio_quality.model_sources(args) == [("moe", "local-dir:/a"), ("unimoe_audio_tiny", "unimoe_audio_tiny")]
    assert args.top_k is None
    assert audio_quality.model_sources(audio_quality.parse_args([])) == [("unimoe_audio_tiny", "unimoe_audio_tiny")]


def test_an_unknown_model_fails_before_the_judge_is_trained(tmp_path):
    with pytest.raises(ValueError, match="Unknown model 'no_such_audio_model'"):
        audio_quality.main(["generated", "--model", "no_such_audio_model", "--results-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
