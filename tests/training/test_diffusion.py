"""DiffusionModule and the moezoo-train / moezoo-export commands, on tiny models and a few steps."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from moezoo.training.callbacks import SampleGrid
from moezoo.training.checkpoints import load_checkpoint
from moezoo.training.cli import build_cli, export_main, main
from moezoo.training.common import adamw, expert_load_stats, update_ema
from moezoo.training.diffusion import DiffusionModule
from moezoo.zoo import create_model

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
TINY = {"depth": 1, "hidden_size": 32, "num_heads": 2, "num_experts": 4}


def tiny_fit_args(config: str, root: Path, *extra: str, subcommand: str | None = "fit") -> list[str]:
    return [
        *([subcommand] if subcommand else []), "--config", str(CONFIGS / config),
        "--model.init_args.model_args", json.dumps(TINY),
        "--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false",
        "--data.init_args.batch_size", "8",
        *extra,
    ]


def test_update_ema_is_the_exponential_moving_average():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = ema.weight.detach().clone()
    update_ema(ema, model, decay=0.9)
    torch.testing.assert_close(ema.weight, 0.9 * before + 0.1 * model.weight.detach())
    # with the step, the decay warms up: min(0.9, (1 + 2) / (10 + 2)) = 0.25 at step 2
    before = ema.weight.detach().clone()
    update_ema(ema, model, decay=0.9, step=2)
    torch.testing.assert_close(ema.weight, 0.25 * before + 0.75 * model.weight.detach())


def test_training_step_adds_the_moe_aux_loss_and_logs_expert_load():
    module = DiffusionModule("dit_moe_digits", model_args=TINY, ema_decay=0.5)
    batch = {"image": torch.rand(4, 1, 16, 16) * 2 - 1, "label": torch.tensor([0, 1, 2, 3]), "caption": ["x"] * 4}
    torch.manual_seed(0)
    total = module.training_step(batch, 0)
    torch.manual_seed(0)
    loss, aux = module.model.training_loss(batch["image"], batch["label"])
    assert aux > 0
    torch.testing.assert_close(total, loss + aux)
    stats = expert_load_stats(module.model)
    # Hand count from the routing record: the busiest expert's share of the routed slots.
    load = module.model.blocks[0].moe.routing.load_E.float()
    assert stats["expert_load/blocks.0.moe/max_share"] == pytest.approx(float(load.max() / load.sum()))
    with pytest.raises(ValueError, match="needs a label for every image"):
        module.training_step({**batch, "label": torch.tensor([0, -1, 2, 3])}, 0)


def test_the_ema_is_what_gets_exported(tmp_path):
    module = DiffusionModule("dit_moe_digits", model_args=TINY, ema_decay=0.9)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    module.on_train_batch_end(None, None, 0)
    module.export(tmp_path / "fp32", {"label_names": list("0123456789")})
    module.export(tmp_path / "fp16", dtype=torch.float16)
    loaded = create_model(f"local-dir:{tmp_path / 'fp32'}", pretrained=True)
    for (name, p), q in zip(module.ema.named_parameters(), loaded.parameters()):
        torch.testing.assert_close(q, p, msg=name)
    assert loaded.pretrained_cfg.metadata["label_names"] == list("0123456789")
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "fp16" / "model.safetensors").values()
               if t.is_floating_point())
    half = create_model(f"local-dir:{tmp_path / 'fp16'}", pretrained=True)
    torch.testing.assert_close(half.blocks[0].moe.w_in, module.ema.blocks[0].moe.w_in, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("config", ["dit_moe_digits.yaml", "dit_dense_digits.yaml", "dit_moe_shapes.yaml"])
def test_every_shipped_config_parses_and_builds(config, tmp_path):
    cli = build_cli(tiny_fit_args(config, tmp_path, subcommand=None), run=False)
    assert isinstance(cli.model, DiffusionModule)
    assert cli.model.model_name == config.removesuffix(".yaml")
    assert cli.trainer.max_steps > 0


def test_fit_then_resume_then_export(tmp_path, capsys):
    main(tiny_fit_args("dit_moe_digits.yaml", tmp_path, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"))
    last = tmp_path / "dit_moe_digits" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 2
    main(tiny_fit_args("dit_moe_digits.yaml", tmp_path / "resumed", "--trainer.max_steps", "4",
                       "--trainer.limit_val_batches", "1", "--ckpt_path", str(last)))
    resumed = tmp_path / "resumed" / "dit_moe_digits" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(resumed)["global_step"] == 4

    export_main([str(resumed), str(tmp_path / "export"), "--metadata", '{"label_names": ["a","b","c","d","e","f","g","h","i","j"]}'])
    model = create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert model.pretrained_cfg.metadata["objective"] == "rf" and model.config.depth == 1
    with pytest.raises(SystemExit):
        export_main([str(resumed), str(tmp_path / "bad"), "--metadata", "[1, 2]"])
    assert "must be a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_text_model_trains_and_draws_a_sample_grid(tmp_path):
    cli = build_cli(tiny_fit_args("dit_moe_shapes.yaml", tmp_path, "--trainer.max_steps", "1",
                                  "--data.init_args.num_train", "8", "--data.init_args.num_val", "4",
                                  subcommand=None), run=False)
    grid = next(c for c in cli.trainer.callbacks if isinstance(c, SampleGrid))
    grid.every_n_epochs, grid.num_samples, grid.num_inference_steps = 1, 4, 2
    cli.trainer.check_val_every_n_epoch = 1
    cli.trainer.fit(cli.model, cli.datamodule)
    assert grid.last_path == tmp_path / "dit_moe_shapes" / "samples" / "epoch=000.png"  # in the run's folder
    # 4 RGB 32x32 samples in one row, 1-pixel padding around each.
    assert Image.open(grid.last_path).size == (4 * 33 + 1, 33 + 1)


def test_export_refuses_checkpoints_of_foreign_modules(tmp_path, capsys):
    # moezoo-export imports the class the checkpoint names: only moezoo.training modules are accepted.
    fake = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "os.system"}, "state_dict": {}}, fake)
    with pytest.raises(SystemExit):
        export_main([str(fake), str(tmp_path / "out")])
    assert "written by os.system" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_freeze_text_encoder_keeps_the_tower_out_of_training():
    module = DiffusionModule("dit_moe_shapes", model_args=TINY, freeze_text_encoder=True)
    tower = module.model.text_encoder
    before = {name: p.detach().clone() for name, p in tower.named_parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in tower.parameters())
    assert id(module.model.text_embedder.weight) in in_optimizer  # the projection still trains
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": torch.tensor([-1, -1]),
             "caption": ["a red square", "a blue circle"]}
    module.training_step(batch, 0).backward()
    optimizer.step()
    assert all(p.grad is None for p in tower.parameters())
    assert module.model.text_embedder.weight.grad is not None
    for name, p in tower.named_parameters():
        assert torch.equal(p, before[name]), name
    with pytest.raises(ValueError, match="has no text encoder"):
        DiffusionModule("dit_moe_digits", model_args=TINY, freeze_text_encoder=True)


def test_adamw_is_fused_on_cpu_and_follows_the_formula():
    """The training modules' AdamW runs torch's fused kernel on CPU; three steps match AdamW written out
    (decoupled weight decay, bias-corrected moments), per parameter group."""
    from tolerance import fp_tolerance

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    optimizer = adamw([{"params": params[:1], "lr": 0.01}, {"params": params[1:], "lr": 0.002}], weight_decay=0.1)
    assert optimizer.defaults["fused"] and all(group["fused"] for group in optimizer.param_groups)
    expected = [p.detach().clone() for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step in range(1, 4):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimizer.step()
        for i, (grad, lr) in enumerate(zip(grads, (0.01, 0.002))):
            m, v = moments[i]
            m.mul_(0.9).add_(0.1 * grad)
            v.mul_(0.999).add_(0.001 * grad * grad)
            expected[i] = expected[i] * (1 - lr * 0.1) - lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach(), want, **fp_tolerance(torch.float32, 1, layers=12))
    module = DiffusionModule("dit_moe_digits", model_args=TINY)
    assert module.configure_optimizers()["optimizer"].defaults["fused"]
    # off the CPU (here: the meta device) torch keeps its default
    assert adamw([torch.zeros(3, dtype=torch.float64, device="meta")], lr=0.1).defaults["fused"] is None


def test_lr_multipliers_put_named_parameters_in_their_own_group():
    module = DiffusionModule("test_dit_moe_video", model_args={"learned_words": ["up", "down"]}, learning_rate=1e-3,
                             warmup_steps=1, freeze_text_encoder=True, lr_multipliers={"word_vectors": 10.0})
    optimizer = module.configure_optimizers()["optimizer"]
    groups = {round(g["lr"], 9): [id(p) for p in g["params"]] for g in optimizer.param_groups}
    assert groups[0.01] == [id(module.model.word_vectors)]
    trained = [p for p in module.model.parameters() if p.requires_grad]
    assert len(groups[0.001]) == len(trained) - 1  # every other trained parameter, once, at the base rate
    # One AdamW step moves each element by about its group's lr (Adam's first step is lr * sign(grad)).
    module.model.word_vectors.grad = torch.ones_like(module.model.word_vectors)
    for p in trained[:1]:
        p.grad = torch.ones_like(p)
    before = module.model.word_vectors.detach().clone()
    optimizer.step()
    torch.testing.assert_close(before - module.model.word_vectors.detach(), torch.full_like(before, 0.01), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"match no trained parameter.*word_vectors"):
        DiffusionModule("test_dit_moe_video", model_args={"learned_words": ["up"]}, lr_multipliers={"text_encoder": 2},
                        freeze_text_encoder=True).configure_optimizers()
