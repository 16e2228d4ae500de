"""ImageTextFolderDataset: your images with a JSON-lines question file; pixels read back, paths confined to the
folder, every malformed line named."""

import json

import numpy as np
import pytest
from PIL import Image

from moezoo.training.datasets.images import ImageTextFolderDataset


def write_folder(root, lines, images=("red.png",)):
    root.mkdir(exist_ok=True)
    for name in images:
        Image.fromarray(np.full((40, 60, 3), (255, 0, 0), np.uint8)).save(root / name)
    (root / "questions.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines))
    return root


def test_items_hold_the_image_question_and_answer(tmp_path):
    root = write_folder(tmp_path / "data", [{"image": "red.png", "question": "what colour is it?", "answer": "red",
                                             "kind": "colour"}, "", {"image": "red.png", "prompt": "describe",
                                                                     "answer": "a red picture"}])
    data = ImageTextFolderDataset(root, image_size=16)
    assert len(data) == 2
    item = data[0]
    assert item["image"].shape == (3, 16, 16)
    assert (item["image"][0] == 1).all() and (item["image"][1:] == -1).all()  # pure red in [-1, 1]
    assert (item["prompt"], item["answer"], item["kind"]) == ("what colour is it?", "red", "colour")
    assert (data[1]["prompt"], data[1]["kind"]) == ("describe", "")


@pytest.mark.parametrize("line, error, message", [
    ("not json", ValueError, r"questions.jsonl:1: not a JSON object"),
    ({"image": "red.png", "answer": "red"}, ValueError, r'questions.jsonl:1: each line needs non-empty strings'),
    ({"image": "../outside.png", "question": "q", "answer": "a"}, ValueError, "outside the folder"),
    ({"image": "/etc/hostname", "question": "q", "answer": "a"}, ValueError, "outside the folder"),
    ({"image": "missing.png", "question": "q", "answer": "a"}, FileNotFoundError, "missing.png' not found"),
])
def test_bad_lines_are_named(tmp_path, line, error, message):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "outside.png")
    root = write_folder(tmp_path / "data", [line])
    with pytest.raises(error, match=message):
        ImageTextFolderDataset(root)


def test_missing_folder_or_file_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageTextFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="question file"):
        ImageTextFolderDataset(tmp_path / "empty")
    root = write_folder(tmp_path / "blank", ["", "  "])
    with pytest.raises(ValueError, match="has no questions"):
        ImageTextFolderDataset(root)
