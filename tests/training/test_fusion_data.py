"""Synthetic infrared/visible pairs (what the rendering promises, checked on the pixels), the paired-folder
DataModule on files written here, and the FusionModule trained by the shipped config."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation, gaussian_filter

from moezoo.training.datamodules.fusion_pairs import PairedFolderDataModule, SyntheticFusionDataModule
from moezoo.training.datasets.fusion_pairs import (
    SyntheticFusionDataset,
    find_pairs,
    fog,
    load_grey,
    low_light,
    synthesize_pair,
)
from moezoo.training.checkpoints import load_checkpoint
from moezoo.training.cli import main
from moezoo.training.datasets.photos import TEST_PHOTOS
from moezoo.training.fusion import FusionModule
from moezoo.zoo import create_model


def _texture(image, region):
    """Mean absolute 4-neighbour Laplacian of the image smoothed a little (so sensor noise does not count as
    texture), over ``region``: how much fine structure the scene has there."""
    smooth = gaussian_filter(image.astype(np.float64), 1.0)
    lap = 4 * smooth[1:-1, 1:-1] - smooth[:-2, 1:-1] - smooth[2:, 1:-1] - smooth[1:-1, :-2] - smooth[1:-1, 2:]
    return float(np.abs(lap)[region[1:-1, 1:-1]].mean())


def test_items_are_fixed_by_seed_and_index():
    ds = SyntheticFusionDataset("train", num_samples=4, image_size=32, seed=3)
    a, b = ds[1], ds[1]
    for key in ("ir", "vis", "mask"):
        assert torch.equal(a[key], b[key])
        assert a[key].shape == (1, 32, 32) and a[key].dtype == torch.float32
        assert 0.0 <= float(a[key].min()) and float(a[key].max()) <= 1.0
    assert not torch.equal(ds[0]["ir"], ds[1]["ir"])
    assert set(torch.unique(a["mask"]).tolist()) <= {0.0, 1.0}


def test_training_pairs_never_use_test_photos():
    ds = SyntheticFusionDataset("train", num_samples=500, image_size=32)
    used = {ds.recipe(i)[0] for i in range(500)}
    assert not used & set(TEST_PHOTOS) and len(used) > 5
    assert ds.pair(7)["photo"] == ds.recipe(7)[0]
    val = SyntheticFusionDataset("test", num_samples=50, image_size=32)
    assert {val.recipe(i)[0] for i in range(50)} == set(TEST_PHOTOS)


@pytest.mark.parametrize("degradation", ["low_light", "fog"])
def test_infrared_is_warm_where_objects_are_and_low_in_texture(degradation):
    rng = np.random.default_rng(0)
    warmer, ir_texture, clean_texture = 0, 0.0, 0.0
    for _ in range(8):
        pair = synthesize_pair("astronaut", rng, image_size=64, degradation=degradation)
        mask = pair["mask"] > 0.5
        if mask.any() and (~mask).any():
            warmer += pair["ir"][mask].mean() > pair["ir"][~mask].mean() + 0.15
        background = ~binary_dilation(mask, iterations=3)  # away from the warm objects' edges
        ir_texture += _texture(pair["ir"], background)
        clean_texture += _texture(pair["clean"], background)
        assert pair["degradation"] == degradation
    assert warmer >= 6 and ir_texture < 0.5 * clean_texture


def test_low_light_darkens_and_fog_lifts_and_flattens():
    rng = np.random.default_rng(1)
    clean = np.tile(np.linspace(0.1, 0.9, 48, dtype=np.float32), (48, 1))
    dark = low_light(clean, rng)
    assert dark.mean() < 0.5 * clean.mean()
    foggy = fog(clean, rng)
    assert foggy.mean() > clean.mean() and foggy.std() < clean.std()
    # the depth ramp grows towards the top of the frame: a black scene gets brighter (more airlight) upwards
    black = fog(np.zeros((48, 48), np.float32), np.random.default_rng(2))
    assert black[:8].mean() > black[-8:].mean()


def test_synthetic_datamodule_batches():
    dm = SyntheticFusionDataModule(image_size=32, num_train_samples=6, num_val_samples=3, batch_size=3)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["ir"].shape == batch["vis"].shape == batch["mask"].shape == (3, 1, 32, 32)
    assert len(batch["name"]) == 3
    assert {dm.val_set[i]["name"].split("/")[0] for i in range(3)} <= set(TEST_PHOTOS)  # held-out scenes


def _write_pairs(root, sizes=((20, 16), (20, 16), (24, 16))):
    rng = np.random.default_rng(0)
    (root / "ir").mkdir()
    (root / "vis").mkdir()
    arrays = {}
    for k, (w, h) in enumerate(sizes):
        ir = rng.integers(0, 256, (h, w), dtype=np.uint8)
        vis = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(ir).save(root / "ir" / f"{k:03d}.png")
        Image.fromarray(vis).save(root / "vis" / f"{k:03d}.{'bmp' if k == 1 else 'png'}")
        arrays[f"{k:03d}"] = (ir, vis)
    return arrays


def test_find_pairs_matches_stems_across_extensions(tmp_path):
    _write_pairs(tmp_path)
    pairs = find_pairs(tmp_path)
    assert [(a.stem, b.name) for a, b in pairs] == [("000", "000.png"), ("001", "001.bmp"), ("002", "002.png")]
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ir" / "lonely.png")
    with pytest.raises(ValueError, match="unpaired.*lonely"):
        find_pairs(tmp_path)
    with pytest.raises(FileNotFoundError, match="ir_dir|is not a directory"):
        find_pairs(tmp_path, ir_dir="Ir")


def test_paired_folder_datamodule_crops_the_same_window(tmp_path):
    arrays = _write_pairs(tmp_path)
    dm = PairedFolderDataModule(tmp_path, crop=8, batch_size=2, val_fraction=0.34, seed=0)
    dm.setup()
    assert len(dm.train_set) == 2 and len(dm.val_set) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["ir"].shape == batch["vis"].shape == (2, 1, 8, 8) and "mask" not in batch
    item = dm.val_set[0]  # the centre window, values as written: infrared / 255, visible as BT.601 luma
    ir, vis = arrays[item["name"]]
    h, w = ir.shape
    window = (slice((h - 8) // 2, (h - 8) // 2 + 8), slice((w - 8) // 2, (w - 8) // 2 + 8))
    np.testing.assert_allclose(item["ir"][0].numpy(), ir[window] / 255.0, atol=1e-6)
    luma = vis[window].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    np.testing.assert_allclose(item["vis"][0].numpy(), luma, atol=1.01 / 255)


def test_load_grey_keeps_16_bit_precision(tmp_path):
    frame = np.array([[0, 1, 1000], [30000, 65534, 65535]], np.uint16)
    Image.fromarray(frame).save(tmp_path / "thermal.png")
    np.testing.assert_allclose(load_grey(tmp_path / "thermal.png"), frame / 65535.0, rtol=1e-6)


def test_unregistered_pair_is_an_error(tmp_path):
    (tmp_path / "ir").mkdir()
    (tmp_path / "vis").mkdir()
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "ir" / "a.png")
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(tmp_path / "vis" / "a.png")
    dm = PairedFolderDataModule(tmp_path, crop=8, batch_size=1, val_fraction=0.0)
    dm.setup()
    with pytest.raises(ValueError, match="not registered"):
        dm.train_set[0]


# ----------------------------------------------------------------------------------------------------------
# FusionModule (training/fusion.py) and the shipped config: the loss it trains with, a short fit, the export
# ----------------------------------------------------------------------------------------------------------

CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "moe_fusion_irvis.yaml"


def test_module_loss_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(0)
    module = FusionModule("test_moe_fusion", grad_weight=3.0, intensity_weight=0.5, attention_weight=2.0).eval()
    batch = {"ir": torch.rand(2, 1, 16, 16), "vis": torch.rand(2, 1, 16, 16),
             "mask": (torch.rand(2, 1, 16, 16) > 0.5).float()}
    terms = module.losses(batch)
    fused, attention = module.model(batch["ir"], batch["vis"], return_attention=True)
    # the attention loss by hand: binary cross-entropy against the mask, mean over pixels
    p, m = attention.clamp(1e-6, 1 - 1e-6), batch["mask"]
    bce = float(-(m * p.log() + (1 - m) * (1 - p).log()).mean())
    assert float(terms["attention_loss"]) == pytest.approx(bce, rel=1e-5)
    expected = (3.0 * terms["grad_loss"] + 0.5 * terms["intensity_loss"] + 2.0 * terms["attention_loss"]
                + terms["aux_loss"])
    assert float(terms["loss"]) == pytest.approx(float(expected), rel=1e-6)
    no_mask = module.losses({"ir": batch["ir"], "vis": batch["vis"]})  # real pairs: no attention supervision
    assert "attention_loss" not in no_mask


def test_shipped_config_fits_two_steps_and_exports(tmp_path):
    export = tmp_path / "export"
    main([
        "fit", "--config", str(CONFIG), "--model.init_args.model", "test_moe_fusion",
        "--model.init_args.export_dir", str(export),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_model_summary", "false",
        "--data.init_args.image_size", "16", "--data.init_args.num_train_samples", "8",
        "--data.init_args.num_val_samples", "2", "--data.init_args.batch_size", "4",
    ])
    last = tmp_path / "moe_fusion_irvis" / "checkpoints" / "last.ckpt"
    trained = load_checkpoint(last)
    assert trained["global_step"] == 2
    loaded = create_model(f"local-dir:{export}", pretrained=True)
    assert loaded.pretrained_cfg.metadata["trained_steps"] == 2
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, trained["state_dict"][f"model.{name}"], msg=name)
    # exporting from the checkpoint later (as moezoo-export does) gives the same weights and step count
    module = FusionModule.load_from_checkpoint(last, map_location="cpu", weights_only=True)
    module.export(tmp_path / "again", dtype=torch.float16)
    again = create_model(f"local-dir:{tmp_path / 'again'}", pretrained=True)
    assert again.pretrained_cfg.metadata["trained_steps"] == 2
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, loaded.state_dict()[name], atol=2e-3, rtol=2e-3, msg=name)
