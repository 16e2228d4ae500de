"""Video data (moezoo.training.datasets.video and .datamodules.video): what the moving-shapes clips show,
measured from their pixels; the caption grammar; the DataModules' batches; reading real video files;
DiffusionModule on video batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from moezoo.pipelines.video_export import export_to_gif, export_to_video
from moezoo.training.datamodules.video import MovingShapesDataModule, VideoFolderDataModule
from moezoo.training.datasets.images import COLOUR_RGB, COLOURS, SHAPES
from moezoo.training.datasets.video import (
    MOTIONS,
    MovingShapesDataset,
    parse_video_caption,
    read_video_frames,
    video_caption_for,
)
from moezoo.training.diffusion import DiffusionModule, clean_input


def first_clip_with(dataset: MovingShapesDataset, **wanted) -> int:
    return next(i for i in range(len(dataset)) if all(dataset.attributes(i).get(k) == v for k, v in wanted.items()))


def centroid(frame_HW3: np.ndarray) -> tuple[float, float]:
    """Brightness-weighted centroid (x, y) in pixels."""
    weight = frame_HW3.max(axis=-1).astype(np.float64)
    ys, xs = np.mgrid[: weight.shape[0], : weight.shape[1]]
    return float((xs * weight).sum() / weight.sum()), float((ys * weight).sum() / weight.sum())


@pytest.mark.parametrize("direction, axis, sign", [("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1)])
def test_moving_shapes_move_the_way_their_caption_says(direction, axis, sign):
    dataset = MovingShapesDataset(200, image_size=32, num_frames=8, seed=0)
    i = first_clip_with(dataset, motion=direction)
    frames = dataset.render(i)
    path = np.array([centroid(f) for f in frames])  # [F, 2] pixels
    steps = np.diff(path[:, axis])
    assert (sign * steps > 0).all()  # every frame moves the right way
    assert 0.3 * 32 < sign * (path[-1, axis] - path[0, axis]) < 0.5 * 32
    assert np.ptp(path[:, 1 - axis]) < 0.5  # and not across
    assert video_caption_for(dataset.attributes(i)).endswith(f"moving {direction}")


def test_clip_colours_sizes_and_background_are_what_the_attributes_say():
    dataset = MovingShapesDataset(300, image_size=32, num_frames=8, seed=1)
    i = first_clip_with(dataset, motion="recolour")
    attrs, frames = dataset.attributes(i), dataset.render(i)
    for frame, name in ((frames[0], attrs["colour"]), (frames[-1], attrs["end_colour"])):
        x, y = (round(v) for v in centroid(frame))
        assert tuple(frame[y, x]) == COLOUR_RGB[name]
        assert tuple(frame[0, 0]) == (0, 0, 0)
    areas = [f.max(axis=-1).sum() for f in dataset.render(first_clip_with(dataset, motion="grow"))]
    assert all(b > a for a, b in zip(areas, areas[1:])) and areas[-1] > 3 * areas[0]
    areas = [f.max(axis=-1).sum() for f in dataset.render(first_clip_with(dataset, motion="shrink"))]
    assert all(b < a for a, b in zip(areas, areas[1:]))


def test_clips_are_deterministic_by_seed_and_index():
    a, b = MovingShapesDataset(5, seed=3), MovingShapesDataset(5, seed=3)
    assert all(np.array_equal(a.render(i), b.render(i)) for i in range(5))
    offset = MovingShapesDataset(3, seed=3, first_index=2)
    assert np.array_equal(offset.render(0), a.render(2))
    other = MovingShapesDataset(5, seed=4)
    assert not all(np.array_equal(a.render(i), other.render(i)) for i in range(5))
    item = a[0]
    assert item["video"].shape == (8, 3, 32, 32) and item["video"].dtype == torch.float32
    assert item["video"].min() == -1.0 and item["video"].max() <= 1.0
    torch.testing.assert_close(item["video"], torch.from_numpy(a.render(0)).permute(0, 3, 1, 2).float() / 127.5 - 1)


def test_subsets_of_motions_shapes_and_colours():
    dataset = MovingShapesDataset(60, motions=["left", "grow"], shapes=["square"], colours=["red", "blue"])
    seen = {tuple(sorted(dataset.attributes(i).items())) for i in range(60)}
    assert {dict(s)["motion"] for s in seen} == {"left", "grow"}
    assert {dict(s)["shape"] for s in seen} == {"square"}
    with pytest.raises(ValueError, match="motions must be a non-empty subset"):
        MovingShapesDataset(1, motions=["spinning"])
    with pytest.raises(ValueError, match="at least two colours"):
        MovingShapesDataset(1, motions=["recolour"], colours=["red"])
    with pytest.raises(ValueError, match="num_frames must be >= 2"):
        MovingShapesDataset(1, num_frames=1)


def test_captions_round_trip_and_bad_captions_are_explained():
    for shape, colour, motion in itertools.product(SHAPES, COLOURS, MOTIONS):
        attrs = {"shape": shape, "colour": colour, "motion": motion}
        if motion == "recolour":
            attrs["end_colour"] = next(c for c in COLOURS if c != colour)
        assert parse_video_caption(video_caption_for(attrs)) == attrs
    assert video_caption_for({"shape": "square", "colour": "red", "motion": "left"}) == "a red square moving left"
    assert parse_video_caption("The Blue circle grows.") == {"colour": "blue", "shape": "circle", "motion": "grow"}
    assert parse_video_caption("a green triangle turns into yellow") == {
        "colour": "green", "shape": "triangle", "motion": "recolour", "end_colour": "yellow"}
    with pytest.raises(ValueError, match="unknown word 'spinning'.*Accepted"):
        parse_video_caption("a red square spinning")
    with pytest.raises(ValueError, match="two shapes"):
        parse_video_caption("a red square circle moving left")
    with pytest.raises(ValueError, match="colour change"):
        parse_video_caption("a red square turning")
    with pytest.raises(ValueError, match="end_colour"):
        video_caption_for({"shape": "square", "colour": "red", "motion": "recolour", "end_colour": "red"})


def test_moving_shapes_datamodule_batches_and_splits():
    dm = MovingShapesDataModule(num_train=6, num_val=3, num_frames=4, image_size=16, batch_size=4,
                                motions=["left", "right"], seed=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"video", "caption"}
    assert batch["video"].shape == (4, 4, 3, 16, 16) and len(batch["caption"]) == 4
    assert all(c.split()[-2:][0] == "moving" for c in batch["caption"])
    val = next(iter(dm.val_dataloader()))
    reference = MovingShapesDataset(9, image_size=16, num_frames=4, motions=["left", "right"], seed=2)
    assert val["caption"] == [reference[6 + j]["caption"] for j in range(3)]  # val = the clips after train
    again = MovingShapesDataModule(num_train=6, num_val=3, num_frames=4, image_size=16, batch_size=4,
                                   motions=["left", "right"], seed=2)
    again.setup("fit")
    assert next(iter(again.train_dataloader()))["caption"] == batch["caption"]  # seeded shuffling
    with pytest.raises(ValueError, match="motions must be a non-empty subset"):
        MovingShapesDataModule(motions=["jump"])


def test_diffusion_module_trains_on_video_batches():
    torch.manual_seed(0)
    module = DiffusionModule(model="test_dit_moe_video", ema_decay=0.0)
    batch = {"video": torch.rand(2, 4, 3, 8, 8) * 2 - 1, "caption": ["a red square moving left", ""]}
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    image = torch.zeros(1, 3, 8, 8)
    assert clean_input({"image": image, "label": torch.tensor([0])}) is image
    with pytest.raises(KeyError, match="'image' or a 'video'"):
        clean_input({"caption": ["x"]})


def solid_frames(colours: list[tuple[int, int, int]], size: int = 16) -> np.ndarray:
    return np.stack([np.full((size, size, 3), c, dtype=np.uint8) for c in colours])


def test_video_folder_reads_mp4_and_gif_with_captions(tmp_path):
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    export_to_video(solid_frames(colours, 32), tmp_path / "a.mp4", fps=4)
    (tmp_path / "a.txt").write_text("four colours\n")
    (tmp_path / "sub").mkdir()
    export_to_gif(solid_frames(colours[:2], 24), tmp_path / "sub" / "b.gif", fps=4)
    (tmp_path / ".hidden.mp4").write_bytes(b"not a video")

    frames = read_video_frames(tmp_path / "a.mp4", num_frames=4, image_size=16)
    assert frames.shape == (4, 16, 16, 3)
    for frame, colour in zip(frames, colours):
        assert np.abs(frame.astype(int) - colour).max() <= 6  # H.264 is lossy
    strided = read_video_frames(tmp_path / "a.mp4", num_frames=2, image_size=16, frame_stride=2)
    assert np.abs(strided[1].astype(int) - colours[2]).max() <= 6
    short = read_video_frames(tmp_path / "sub" / "b.gif", num_frames=4, image_size=16)
    assert np.array_equal(short[2], short[1]) and np.array_equal(short[3], short[1])  # last frame repeated

    dm = VideoFolderDataModule(tmp_path, image_size=16, num_frames=4, batch_size=2, val_fraction=0.0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 4, 3, 16, 16)
    assert sorted(batch["caption"]) == ["", "four colours"]
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0


def test_video_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFolderDataModule(tmp_path / "missing").setup("fit")
    Image.new("RGB", (4, 4)).save(tmp_path / "still.png")
    with pytest.raises(FileNotFoundError, match="no videos found.*\\.mp4"):
        VideoFolderDataModule(tmp_path).setup("fit")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot read video"):
        read_video_frames(tmp_path / "broken.mp4", 2, 16)
    with pytest.raises(ValueError, match="must be >= 1"):
        VideoFolderDataModule(tmp_path, num_frames=0)
