"""The bundled unimoe_audio_tiny, judged by what it never trained with: the pitch of the notes it plays, read by
YIN (a formula, moezoo.training.audio_metrics), and the pitch classes of its chords, read from the chroma. The
full measurement (words by a judge network, every note and chord, routing, speed) is bench/audio_quality.py;
this is its smallest slice, so that a change that breaks the bundled model fails here."""

import math

import numpy as np
import pytest
import torch

from moezoo.pipelines import AudioPipeline
from moezoo.training.audio_metrics import cents_error, heard_pitch_classes, median_f0, pitch_class_f1
from moezoo.training.datasets.audio import midi_to_hz
from moezoo.zoo import create_model
from moezoo.zoo.hub import WEIGHTS_DIR
from moezoo.zoo.registry import get_pretrained_cfg

# (prompt, MIDI): one note of each timbre across the range
NOTES = [("a sine A3 note", 57), ("a square C4 note", 60), ("a sawtooth E4 note", 64), ("a plucked G3 note", 55),
         ("a square F#4 note", 66), ("a sawtooth C3 note", 48)]
CHORDS = [("a C major chord on a sine wave", {0, 4, 7}), ("a A minor chord on a square wave", {9, 0, 4}),
          ("a G major chord on a sawtooth wave", {7, 11, 2}), ("a D minor chord on a plucked string", {2, 5, 9}),
          ("a F major chord on a square wave", {5, 9, 0}), ("a E minor chord on a sawtooth wave", {4, 7, 11})]


@pytest.fixture(scope="module")
def pipe():
    pipe = AudioPipeline.from_pretrained("unimoe_audio_tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_bundled_file_is_small_pinned_and_strictly_loaded():
    cfg = get_pretrained_cfg("unimoe_audio_tiny")
    model = create_model("unimoe_audio_tiny", pretrained=True)  # strict: a missing or extra key fails here
    assert cfg.sha256 and cfg.file.endswith(".safetensors")
    assert (WEIGHTS_DIR / cfg.file).stat().st_size <= 20e6  # the size limit for the bundled model
    assert model.codec is not None and model.vocoder is not None


def test_it_plays_the_notes_asked_for(pipe):
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(NOTES))]
    audios = pipe([prompt for prompt, _ in NOTES], generator=generators).audios
    errors = [cents_error(median_f0(audio), midi_to_hz(midi)) for audio, (_, midi) in zip(audios, NOTES)]
    within = [abs(e) <= 50 for e in errors if not math.isnan(e)]
    # bench/audio_quality.py: 90.6% of all 96 notes within 50 cents; 4 of these 6 leaves room for two misses
    assert sum(within) >= 4, f"cents off per note: {errors}"


def test_its_chords_have_the_asked_pitch_classes(pipe):
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(CHORDS))]
    audios = pipe([prompt for prompt, _ in CHORDS], generator=generators).audios
    scores = [pitch_class_f1(heard_pitch_classes(audio), classes) for audio, (_, classes) in zip(audios, CHORDS)]
    assert np.mean(scores) >= 0.7, scores
