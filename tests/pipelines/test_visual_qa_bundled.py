"""The bundled moe_vlm_tiny, judged on scenes and sounds it never trained with, against answers read from the
scene generator's objects and the speech generator's words (not from the model). The full measurement is
bench/mllm_compare.py; this is its smallest slice, so that a change that breaks the bundled model fails here."""

import pytest

from moezoo.pipelines import VisualQAPipeline
from moezoo.training.datasets.audio import espeak_unavailable_reason, speak, speech_speakers
from moezoo.training.datasets.scenes import (
    COUNT_WORDS, caption_f1, render_scene, sample_scene, scene_caption, scene_rng,
)
from moezoo.zoo import create_model
from moezoo.zoo.hub import WEIGHTS_DIR
from moezoo.zoo.registry import get_pretrained_cfg

SCENES = range(20)  # test-split scenes (seed 0): the split no training run draws from


@pytest.fixture(scope="module")
def pipe():
    return VisualQAPipeline.from_pretrained("moe_vlm_tiny")


def test_the_bundled_file_is_small_pinned_and_strictly_loaded():
    cfg = get_pretrained_cfg("moe_vlm_tiny")
    create_model("moe_vlm_tiny", pretrained=True)  # strict: a missing or extra key fails here
    assert cfg.sha256 and cfg.file.endswith(".safetensors")
    assert (WEIGHTS_DIR / cfg.file).stat().st_size <= 20e6  # the size limit for the bundled model


def test_it_names_the_shape_of_an_object_and_describes_the_scene(pipe):
    scenes = [sample_scene(scene_rng("test", 0, i), "test") for i in SCENES]
    images = [render_scene(objects) for objects in scenes]
    prompts = [f"what shape is the {objects[0].colour} object?" for objects in scenes]
    shapes = pipe(images=images, prompt=prompts).text
    assert sum(answer == objects[0].shape for answer, objects in zip(shapes, scenes)) >= 18  # of 20
    captions = pipe(images=images, prompt="describe the picture.").text
    f1 = [caption_f1(caption, scene_caption(objects)) for caption, objects in zip(captions, scenes)]
    assert sum(f1) / len(f1) >= 0.85


def test_it_answers_existence_counting_and_extremes(pipe):
    scenes = [sample_scene(scene_rng("test", 0, i), "test") for i in SCENES]
    images = [render_scene(objects) for objects in scenes]
    # one present pair and one pair whose colour is in the scene on another shape (binding colour to shape)
    def question(colour, shape):
        return f"is there {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}?"

    other = {"circle": "square", "square": "triangle", "triangle": "circle"}
    present = [question(objects[0].colour, objects[0].shape) for objects in scenes]
    swapped = [(objects[0].colour, other[objects[0].shape]) for objects in scenes]
    absent = [question(colour, shape) for colour, shape in swapped]
    truth_absent = ["yes" if any((o.colour, o.shape) == pair for o in objects) else "no"
                    for pair, objects in zip(swapped, scenes)]
    answers = pipe(images=images + images, prompt=present + absent).text
    right = sum(a == "yes" for a in answers[:20]) + sum(a == t for a, t in zip(answers[20:], truth_absent))
    assert right >= 38  # of 40
    counts = pipe(images=images, prompt="how many objects are there?").text
    assert sum(c == COUNT_WORDS[len(objects)] for c, objects in zip(counts, scenes)) >= 18  # of 20
    rightmost = pipe(images=images, prompt="what colour is the rightmost object?").text
    truth = [max(objects, key=lambda o: o.cx).colour for objects in scenes]
    assert sum(a == t for a, t in zip(rightmost, truth)) >= 17  # of 20


def test_it_hears_words_said_by_voices_it_never_trained_on(pipe):
    if espeak_unavailable_reason():
        pytest.skip(espeak_unavailable_reason())
    speakers = speech_speakers("judge")
    words = ["seven", "yes", "stop", "left", "two", "go"]
    clips = [speak(word, speakers[i * 3].name, 165, 50).numpy() for i, word in enumerate(words)]
    answers = pipe(audio=clips, prompt="which word is this?").text
    assert sum(a == w for a, w in zip(answers, words)) >= 5  # of 6
