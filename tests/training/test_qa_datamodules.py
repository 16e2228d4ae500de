"""The question-answering DataModules: batches in the documented format, splits that keep their promises (the
held-out colour-shape pairs only in the held-out test loader), your folder split by seed."""

import json

import numpy as np
import pytest
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
