"""The question-answering DataModules: batches in the documented format, splits that keep their promises (the
held-out colour-shape pairs only in the held-out test loader), your folder split by seed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from moezoo.training.datamodules.scenes import ImageTextFolderDataModule, ScenesQADataModule
from moezoo.training.datasets.scenes import HELD_OUT_PAIRS


def test_scene_batches_and_splits():
    module = ScenesQADataModule(num_train=24, num_val=6, num_test=12, image_size=32, batch_size=12, seed=3)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (12, 3, 32, 32) and len(batch["prompt"]) == len(batch["answer"]) == 12
    assert set(batch["kind"]) <= {"shape", "colour", "count", "relation", "exists", "caption"}
    assert len(next(iter(module.val_dataloader()))["prompt"]) == 6
    train_captions = [a for b in module.train_dataloader() for a, k in zip(b["answer"], b["kind"]) if k == "caption"]
    assert train_captions and not any(f"{c} {s}" in a for a in train_captions for c, s in HELD_OUT_PAIRS)
    test, held_out = module.test_dataloader()
    held_captions = [a for b in held_out for a, k in zip(b["answer"], b["kind"]) if k == "caption"]
    assert held_captions and all(any(f"{c} {s}" in a for c, s in HELD_OUT_PAIRS) for a in held_captions)
    assert len(test.dataset) == len(held_out.dataset) == 12



def test_several_questions_per_training_scene_and_the_object_centres_in_batches():
    module = ScenesQADataModule(num_train=8, num_val=4, num_test=4, image_size=32, batch_size=48, seed=3,
                                cache=True, questions_per_scene=6)
    module.setup("fit")
    batches = list(module.train_dataloader())
    assert sum(len(b["prompt"]) for b in batches) == 48  # 8 scenes x 6 questions; validation keeps one each
    assert sum(len(b["prompt"]) for b in module.val_dataloader()) == 4
    (batch,) = batches
    assert batch["centres"].shape == (48, 6, 2)
    present = ~batch["centres"].isnan().any(-1)
    assert (present.sum(1) == torch.tensor([len(c.split(", ")) + c.count(" and ") for c in batch["caption"]])).all()
    inside = batch["centres"][present]
    assert ((inside > 0) & (inside < 1)).all()

def test_your_folder_is_split_by_seed(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black.png")
    lines = [json.dumps({"image": "black.png", "question": f"question {i}?", "answer": "black"}) for i in range(10)]
    (tmp_path / "questions.jsonl").write_text("\n".join(lines))
    module = ImageTextFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.2, batch_size=4, seed=1)
    module.setup("fit")
    train = [p for b in module.train_dataloader() for p in b["prompt"]]
    val = [p for b in module.val_dataloader() for p in b["prompt"]]
    assert len(train) == 8 and len(val) == 2 and not set(train) & set(val)
    assert sorted(train + val) == sorted(f"question {i}?" for i in range(10))
    with pytest.raises(ValueError, match="val_fraction"):
        ImageTextFolderDataModule(str(tmp_path), val_fraction=1.0)


def test_sound_questions_answer_what_is_heard():
    from moezoo.training.audio_metrics import cents_error, median_f0
    from moezoo.training.datamodules.scenes import ScenesSoundsQADataModule
    from moezoo.training.datasets.audio import midi_to_hz, note_midi, espeak_unavailable_reason

    if espeak_unavailable_reason():
        pytest.skip(espeak_unavailable_reason())
    module = ScenesSoundsQADataModule(num_train=8, num_val=4, num_test=4, batch_size=4, sound_batch_size=6,
                                      note_renditions=1, num_test_sounds=6, cache=False)
    module.setup("fit")
    sounds = module.sound_train
    kinds = {sounds[i]["kind"] for i in range(len(sounds))}
    assert kinds == {"word", "note"}
    notes = [sounds[i] for i in range(len(sounds)) if sounds[i]["kind"] == "note"]
    assert len(notes) == 24 * 4  # every note in every timbre, one rendition
    for item in notes[::7]:  # the pitch heard (YIN) is the note named, within 50 cents
        assert item["prompt"] == "which note is this?"
        assert abs(cents_error(median_f0(item["audio"].numpy()), midi_to_hz(note_midi(item["answer"])))) < 50
    words = [sounds[i] for i in range(0, len(sounds), 97) if sounds[i]["kind"] == "word"]
    assert all(item["caption"] == f"the word {item['answer']}" and item["prompt"] == "which word is this?"
               for item in words)
    batch = next(iter(module.train_dataloader()["sound"]))
    assert batch["audio"].shape[0] == 6 and len(batch["answer"]) == 6
    loaders = module.test_dataloader()
    assert len(loaders) == 3  # test scenes, held-out pairs, then sounds of unseen speakers and renditions
    assert len(loaders[2].dataset) == 12
