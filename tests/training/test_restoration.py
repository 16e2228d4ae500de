"""RestorationModule (MoFME training): loss, schedule, per-weather validation metrics, the configs, fit + export."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moezoo.training.checkpoints import load_checkpoint
from moezoo.training.cli import build_cli, main
from moezoo.training.common import warmup_cosine
from moezoo.training.restoration import RestorationModule
from moezoo.zoo import create_model

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
MOFME_CONFIGS = ["mofme_weather.yaml", "mofme_conventional_weather.yaml", "mofme_dense_weather.yaml"]


def tiny_args(config: str, root: Path, *extra: str, subcommand: str | None = "fit") -> list[str]:
    return [
        *([subcommand] if subcommand else []), "--config", str(CONFIGS / config),
        "--model.init_args.model", "test_mofme", "--model.init_args.export_dir", str(root / "export"),
        "--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false",
        "--data.init_args.crop_size", "8", "--data.init_args.batch_size", "2",
        "--data.init_args.train_length", "8", "--data.init_args.val_length", "4",
        *extra,
    ]


def test_warmup_cosine_by_hand():
    assert [warmup_cosine(s, warmup=4, total=12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(8, warmup=4, total=12) == pytest.approx(0.5)  # half-way down the cosine
    assert warmup_cosine(6, warmup=4, total=12) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert warmup_cosine(12, warmup=4, total=12) == pytest.approx(0.0)
    assert warmup_cosine(50, warmup=4, total=12) == pytest.approx(0.0)
    assert warmup_cosine(500, warmup=0, total=math.inf) == 1.0


def batch(n=4, size=8):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(n, 3, size, size, generator=g)
    return {"input": (target + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1), "target": target,
            "weather": torch.tensor([0, 1, 0, -1])[:n]}


def test_training_step_is_l1_plus_the_moe_aux_loss():
    module = RestorationModule("test_mofme", model_args={"aux_loss_coefs": {"load_balance": 0.5}})
    b = batch()
    torch.manual_seed(0)
    total = module.training_step(b, 0)
    aux = module.model.aux_loss()
    torch.manual_seed(0)  # the same router dropout masks
    restored = module.model(b["input"])
    l1 = float((restored - b["target"]).abs().sum()) / restored.numel()
    assert float(aux) > 0
    assert float(total) == pytest.approx(l1 + float(aux), rel=1e-5)


def test_validation_psnr_is_the_mean_of_per_image_psnrs_by_weather():
    module = RestorationModule("test_mofme", weather_types=["rain_streaks", "raindrops"])
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # noqa: E731
    b = batch()
    module.eval()
    module.validation_step(b, 0)
    module.on_validation_epoch_end()
    with torch.no_grad():
        restored = module.model(b["input"]).clamp(0, 1)
    psnr = [10 * math.log10(1 / float(((restored[i] - b["target"][i]) ** 2).mean())) for i in range(4)]
    assert logged["val/psnr"] == pytest.approx(sum(psnr) / 4, rel=1e-5)
    assert logged["val/psnr/rain_streaks"] == pytest.approx((psnr[0] + psnr[2]) / 2, rel=1e-5)
    assert logged["val/psnr/raindrops"] == pytest.approx(psnr[1], rel=1e-5)
    assert 0 < logged["val/ssim"] <= 1
    psnr_in = [10 * math.log10(1 / float(((b["input"][i] - b["target"][i]) ** 2).mean())) for i in range(4)]
    assert logged["val/psnr_input"] == pytest.approx(sum(psnr_in) / 4, rel=1e-5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown loss"):
        RestorationModule("test_mofme", loss="ssim")
    with pytest.raises(ValueError, match="lr_schedule"):
        RestorationModule("test_mofme", lr_schedule="step")
    with pytest.raises(ValueError, match="export_dtype"):
        RestorationModule("test_mofme", export_dtype="bfloat16")


@pytest.mark.parametrize("config", MOFME_CONFIGS)
def test_every_mofme_config_parses_and_builds(config, tmp_path):
    cli = build_cli(["--config", str(CONFIGS / config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.model, RestorationModule) and cli.model.model_name == config.removesuffix(".yaml")
    assert cli.trainer.max_steps > 0 and cli.datamodule.crop_size == 64


def test_the_three_configs_differ_only_in_the_model():
    import yaml

    configs = [yaml.safe_load((CONFIGS / c).read_text()) for c in MOFME_CONFIGS]
    for cfg in configs:
        assert cfg["trainer"]["logger"]["init_args"].pop("name") == cfg["model"]["init_args"].pop("model")
    assert configs[0] == configs[1] == configs[2]


def test_fit_exports_a_loadable_fp16_model(tmp_path):
    main(tiny_args("mofme_weather.yaml", tmp_path, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"))
    export = tmp_path / "export"
    tensors = load_file(export / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
    model = create_model(f"local-dir:{export}", pretrained=True)
    assert model.config.ffn == "film" and model.pretrained_cfg.metadata["tile_size"] == 256
    ckpt = load_checkpoint(tmp_path / "mofme_weather" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    trained = ckpt["state_dict"]["model.layers.0.ffn.scale_ED"]
    torch.testing.assert_close(model.layers[0].ffn.scale_ED, trained, atol=2e-3, rtol=2e-3)
