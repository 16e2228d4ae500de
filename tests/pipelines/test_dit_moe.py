"""DiTMoEPipeline: argument checks before compute, sampling against a hand-written sampler, seeds, outputs,
routing maps, and loading from an exported folder."""

import numpy as np
import pytest
import torch
from PIL import Image

from moezoo.pipelines import DiTMoEPipeline
from moezoo.zoo import create_model, save_pretrained

TINY = dict(depth=1, hidden_size=32, num_heads=2, num_experts=4)


def randomise(module, seed=0):
    """Random weights everywhere (the adaLN-zero init would make every prediction 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = p[0].numel() ** -0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


@pytest.fixture(scope="module")
def digits_pipe():
    model = randomise(create_model("dit_moe_digits", **TINY))
    pipe = DiTMoEPipeline(model, label_names=[f"digit {d}" for d in range(10)])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def shapes_pipe():
    model = randomise(create_model("dit_moe_shapes", **TINY), seed=1)
    pipe = DiTMoEPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class CountingForward:
    """Counts forwards of a model so a test can check that a bad call did no compute."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_labels=[12]), "out of range"),
    (dict(class_labels=["seven"]), "unknown class 'seven'; accepted: digit 0"),
    (dict(class_labels=[1], num_inference_steps=0), "positive integer"),
    (dict(class_labels=[1], guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (dict(class_labels=[1, 2], generator=[torch.Generator()]), "1 generators for 2 outputs"),
    (dict(class_labels=[1], output_type="jpeg"), "accepted: pil, np, pt"),
    (dict(), "exactly one of class_labels"),
    (dict(class_labels=[1], prompt="a"), "exactly one of class_labels"),
    (dict(prompt="a red circle"), "not text-conditioned"),
])
def test_bad_arguments_fail_before_any_compute(digits_pipe, kwargs, message):
    counter = CountingForward(digits_pipe.transformer)
    try:
        with pytest.raises(ValueError, match=message):
            digits_pipe(**kwargs)
    finally:
        counter.handle.remove()
    assert counter.calls == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "empty list"),
    (dict(prompt=["a", 3]), "list of strings"),
    (dict(class_labels=[1]), "not class-conditional"),
    (dict(prompt=["a", "b", "c"], generator=[torch.Generator()] * 2), "2 generators for 3 outputs"),
])
def test_bad_text_arguments_fail_before_any_compute(shapes_pipe, kwargs, message):
    counter = CountingForward(shapes_pipe.transformer)
    try:
        with pytest.raises(ValueError, match=message):
            shapes_pipe(**kwargs)
    finally:
        counter.handle.remove()
    assert counter.calls == 0


@torch.no_grad()
def test_rectified_flow_sampling_is_euler_on_the_model_velocity(digits_pipe):
    # Reference: Euler steps on dx/dt = v(x, t) from t = 1 (noise) down to 0, on diffusers' flow-match grid
    # (N times evenly from 1 to 1/1000, then 0), with classifier-free guidance combined by hand.
    model, steps, scale = digits_pipe.transformer, 4, 3.0
    labels = torch.tensor([3, 8])
    x = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    grid = [*np.linspace(1.0, 1e-3, steps).tolist(), 0.0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        t_B = torch.full((2,), t)
        cond = model(x, t_B, labels)
        uncond = model(x, t_B, torch.full((2,), model.null_class))
        v = uncond + scale * (cond - uncond)
        x = x + (t_next - t) * v
    expected = (x.clamp(-1, 1) + 1) / 2

    out = digits_pipe(class_labels=[3, "digit 8"], num_inference_steps=steps, guidance_scale=scale,
                      generator=torch.Generator().manual_seed(5), output_type="pt")
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_a_time_shifted_model_samples_on_the_shifted_grid(tmp_path):
    # Reference: Euler steps on the grid t' = s t / (1 + (s - 1) t) of evenly spaced t; diffusers spaces
    # them from 1 down to the shifted smallest training time (the shift of 1/1000), then shifts them.
    shift, steps = 3.0, 3
    lowest = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
    model = randomise(create_model("dit_moe_digits", time_shift=shift, **TINY), seed=2).eval()
    save_pretrained(model, tmp_path, "dit_moe_digits", {**TINY, "time_shift": shift}, {"objective": "rf"})
    x = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(6))
    grid = [shift * t / (1 + (shift - 1) * t) for t in np.linspace(1.0, lowest, steps)] + [0.0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * model(x, torch.full((1,), t), torch.tensor([4]))
    expected = (x.clamp(-1, 1) + 1) / 2
    for pipe in (DiTMoEPipeline(model), DiTMoEPipeline.from_pretrained(f"local-dir:{tmp_path}")):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(class_labels=[4], num_inference_steps=steps, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(6), output_type="pt")
        torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=1e-4)


def test_generators_give_reproducible_independent_samples(digits_pipe):
    def run(labels, seeds):
        return digits_pipe(class_labels=labels, num_inference_steps=2, generator=[torch.Generator().manual_seed(s)
                           for s in seeds], output_type="np").images

    pair = run([1, 2], [10, 11])
    np.testing.assert_allclose(pair, run([1, 2], [10, 11]))
    # One generator per image: an image does not depend on what else is in the batch.
    np.testing.assert_allclose(pair[1:], run([2], [11]), atol=1e-5)
    assert not np.allclose(pair[0], run([1], [12])[0])


def test_output_types_and_tuple_return(digits_pipe):
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pil = digits_pipe(class_labels=[4], num_inference_steps=2, generator=gen()).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (16, 16) and pil[0].mode == "L"
    array = digits_pipe(class_labels=[4], num_inference_steps=2, generator=gen(), output_type="np").images
    assert array.shape == (1, 16, 16, 1) and 0 <= array.min() and array.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil[0]), (array[0, ..., 0] * 255).round().astype(np.uint8))
    images, = digits_pipe(class_labels=[4], num_inference_steps=2, generator=gen(), output_type="pt",
                          return_dict=False)
    assert images.shape == (1, 1, 16, 16)


def test_routing_maps_are_each_patchs_top_expert(digits_pipe):
    out = digits_pipe(class_labels=[0, 5, 9], num_inference_steps=2, guidance_scale=2.0, return_routing=True,
                      generator=torch.Generator().manual_seed(1))
    model = digits_pipe.transformer
    assert len(out.routing_maps) == model.config.depth
    for block, routing_map in zip(model.blocks, out.routing_maps):
        assert routing_map.shape == (3, 8, 8) and routing_map.dtype == np.int64
        # The last forward ran [conditional; unconditional] (6 images); the map is the conditional half's
        # first choice, patch by patch in raster order.
        record = block.moe.routing
        assert record.tokens_shape == (6, 64)
        np.testing.assert_array_equal(routing_map.reshape(3, 64), record.ids_TK[:, 0].reshape(6, 64)[:3].numpy())
        assert routing_map.min() >= 0 and routing_map.max() < model.config.num_experts


def test_text_prompts_generate_one_image_each(shapes_pipe):
    out = shapes_pipe(prompt=["a large red circle on the left", "a small blue square at the top"],
                      num_inference_steps=2, generator=torch.Generator().manual_seed(0), return_routing=True)
    assert len(out.images) == 2 and out.images[0].size == (32, 32) and out.images[0].mode == "RGB"
    assert out.routing_maps[0].shape == (2, 8, 8)
    single = shapes_pipe(prompt="a small blue square at the top", num_inference_steps=2, output_type="np",
                         generator=torch.Generator().manual_seed(0))
    assert single.images.shape == (1, 32, 32, 3)


def test_ddpm_models_sample_with_ddim(tmp_path):
    model = randomise(create_model("dit_moe_digits", objective="ddpm", **TINY))
    pipe = DiTMoEPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    out = pipe(class_labels=[1, 2], num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 16, 16, 1) and np.isfinite(out.images).all()


def test_from_pretrained_reads_an_exported_folder_with_its_label_names(tmp_path):
    model = randomise(create_model("dit_moe_digits", **TINY), seed=3).eval()
    names = [f"n{d}" for d in range(10)]
    save_pretrained(model, tmp_path, "dit_moe_digits", TINY, {"label_names": names, "objective": "rf"})
    pipe = DiTMoEPipeline.from_pretrained(f"local-dir:{tmp_path}")
    assert pipe.label_names == names and pipe.get_label_ids(["n3", 4]) == [3, 4]
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(x, t, y), model(x, t, y))
    with pytest.raises(ValueError, match="samples with .flow_match_euler., not .ddim."):
        DiTMoEPipeline.from_pretrained(f"local-dir:{tmp_path}", scheduler="ddim")
