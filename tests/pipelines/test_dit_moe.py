"""DiTMoEPipeline: argument checks before compute, sampling against a hand-written sampler, seeds, outputs,
routing maps, and loading from an exported folder."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from moezoo.pipelines import DiTMoEPipeline, make_scheduler
from moezoo.pipelines.dit_moe import DEFAULT_SAMPLING
from moezoo.zoo import create_model, get_pretrained_cfg, save_pretrained
from helpers import randomise
from tolerance import fp_tolerance

TINY = dict(depth=1, hidden_size=32, num_heads=2, num_experts=4)


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


@contextlib.contextmanager
def recorded_forwards(model):
    """The batch size of every forward of ``model`` while the block runs, so a test can check that a bad call did
    no compute or how a request was chunked. The instance's ``forward`` is wrapped (not a hook): guidance runs
    ``self.forward`` directly, which hooks do not see."""
    sizes = []
    forward = model.forward
    model.forward = lambda x, *args, **kwargs: sizes.append(x.shape[0]) or forward(x, *args, **kwargs)
    try:
        yield sizes
    finally:
        del model.forward


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_labels=[12]), "out of range"),
    (dict(class_labels=["seven"]), "unknown class 'seven'; accepted: digit 0"),
    (dict(class_labels=[1], num_inference_steps=0), "positive integer"),
    (dict(class_labels=[1], num_inference_steps=True), "num_inference_steps must be a positive integer, got True"),
    (dict(class_labels=[1], num_inference_steps=2.0), "num_inference_steps must be a positive integer, got 2.0"),
    (dict(class_labels=[1], guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
    (dict(class_labels=[1, 2], generator=[torch.Generator()]), "1 generators for 2 outputs"),
    (dict(class_labels=[1], output_type="jpeg"), "accepted: pil, np, pt"),
    (dict(), "exactly one of class_labels"),
    (dict(class_labels=[1], prompt="a"), "exactly one of class_labels"),
    (dict(prompt="a red circle"), "not text-conditioned"),
])
def test_bad_arguments_fail_before_any_compute(digits_pipe, kwargs, message):
    with recorded_forwards(digits_pipe.transformer) as forwards, pytest.raises(ValueError, match=message):
        digits_pipe(**kwargs)
    assert forwards == []


# None is not here: it means the pipeline's default (test_none_means_the_pipelines_default), as height=None does
# in diffusers.
BAD_GUIDANCE = [float("nan"), float("inf"), -float("inf"), -0.5, "3", True, [2.0], torch.tensor(2.0)]


@pytest.mark.parametrize("guidance_scale", BAD_GUIDANCE, ids=repr)
def test_guidance_scale_must_be_a_finite_number_at_least_zero(digits_pipe, shapes_pipe, guidance_scale):
    for pipe, request in ((digits_pipe, dict(class_labels=[1])), (shapes_pipe, dict(prompt="a red circle"))):
        with recorded_forwards(pipe.transformer) as forwards, pytest.raises(
                ValueError, match=r"guidance_scale must be a finite number >= 0 \(1 = no guidance"):
            pipe(**request, guidance_scale=guidance_scale, num_inference_steps=1)
        assert forwards == []


def test_numbers_of_any_real_number_type_are_accepted(digits_pipe):
    def run(guidance_scale):
        return digits_pipe(class_labels=[2], num_inference_steps=2, guidance_scale=guidance_scale, output_type="pt",
                           generator=torch.Generator().manual_seed(3)).images

    reference = run(2.0)
    for same in (2, np.float32(2.0), np.int64(2)):
        torch.testing.assert_close(run(same), reference, rtol=0, atol=0)
    numpy_steps = digits_pipe(class_labels=[2], num_inference_steps=np.int64(2), guidance_scale=2.0, output_type="pt",
                              generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(numpy_steps, reference, rtol=0, atol=0)
    assert run(0).isfinite().all()  # 0: the unconditional prediction alone


@pytest.mark.parametrize("max_batch_size", [0, -2, 2.5, True, "4"], ids=repr)
def test_max_batch_size_must_be_a_positive_integer(digits_pipe, max_batch_size):
    with recorded_forwards(digits_pipe.transformer) as forwards, pytest.raises(
            ValueError, match="max_batch_size must be a positive integer"):
        digits_pipe(class_labels=[1, 2], max_batch_size=max_batch_size)
    assert forwards == []


def chunked_and_whole(pipe, request: dict, count: int, chunk: int, steps: int = 2, **options):
    """The same request run in chunks of ``chunk`` and in one batch, one seeded generator per image; also the
    batch sizes the chunked run's forwards saw."""
    def run(max_batch_size):
        generators = [torch.Generator().manual_seed(100 + i) for i in range(count)]
        return pipe(**request, num_inference_steps=steps, generator=generators, output_type="pt",
                    return_routing=True, max_batch_size=max_batch_size, **options)

    with recorded_forwards(pipe.transformer) as sizes:
        chunked = run(chunk)
    return chunked, run(count), sizes


def assert_same_images_and_routing(chunked, whole, depth: int, steps: int):
    # Each image's arithmetic is the same in both runs; only GEMM blocking over the batch differs, so the
    # difference is rounding through every step's forward (width-32 reductions, MLP hidden 128).
    torch.testing.assert_close(chunked.images, whole.images, **fp_tolerance(torch.float32, 128, layers=depth * steps))
    assert len(chunked.routing_maps) == len(whole.routing_maps) == depth
    for chunked_map, whole_map in zip(chunked.routing_maps, whole.routing_maps):
        assert chunked_map.shape == whole_map.shape
        np.testing.assert_array_equal(chunked_map, whole_map)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_a_large_request_runs_in_chunks_with_the_same_result(digits_pipe, guidance_scale):
    labels = [3, 1, 4, 1, 5]
    chunked, whole, sizes = chunked_and_whole(digits_pipe, dict(class_labels=labels), 5, 2,
                                              guidance_scale=guidance_scale)
    rows = 2 if guidance_scale != 1.0 else 1  # guidance runs [conditional; unconditional] in one forward
    assert sizes == [2 * rows, 2 * rows, 2 * rows, 2 * rows, rows, rows]  # chunks of 2, 2, 1; two steps each
    assert chunked.images.shape == (5, 1, 16, 16)
    assert_same_images_and_routing(chunked, whole, depth=1, steps=2)


def test_text_requests_are_chunked_too(shapes_pipe):
    prompts = ["a large red circle on the left", "a small blue square at the top", "a green triangle"]
    chunked, whole, sizes = chunked_and_whole(shapes_pipe, dict(prompt=prompts), 3, 2, guidance_scale=3.0)
    assert sizes == [4, 4, 2, 2]
    assert_same_images_and_routing(chunked, whole, depth=1, steps=2)


def test_ancestral_ddpm_noise_comes_from_each_images_generator():
    # Ancestral sampling draws fresh noise every step: from each image's own generator, so chunking (and what
    # else is in the batch) does not change an image.
    model = randomise(create_model("dit_moe_digits", objective="ddpm", **TINY), seed=4)
    pipe = DiTMoEPipeline(model, scheduler=make_scheduler("ddpm", "ddpm"))
    pipe.set_progress_bar_config(disable=True)
    chunked, whole, _ = chunked_and_whole(pipe, dict(class_labels=[0, 7, 7]), 3, 1, steps=3, guidance_scale=2.0)
    assert_same_images_and_routing(chunked, whole, depth=1, steps=3)


def test_the_default_chunk_size_is_the_pipelines_attribute(digits_pipe, monkeypatch):
    assert DiTMoEPipeline.max_batch_size == 32
    monkeypatch.setattr(digits_pipe, "max_batch_size", 3)
    with recorded_forwards(digits_pipe.transformer) as sizes:
        digits_pipe(class_labels=list(range(7)), num_inference_steps=1, guidance_scale=1.0)
    assert sizes == [3, 3, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "empty list"),
    (dict(prompt=["a", 3]), "list of strings"),
    (dict(class_labels=[1]), "not class-conditional"),
    (dict(prompt=["a", "b", "c"], generator=[torch.Generator()] * 2), "2 generators for 3 outputs"),
])
def test_bad_text_arguments_fail_before_any_compute(shapes_pipe, kwargs, message):
    with recorded_forwards(shapes_pipe.transformer) as forwards, pytest.raises(ValueError, match=message):
        shapes_pipe(**kwargs)
    assert forwards == []


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


def test_heun_sampling_is_the_trapezoid_rule_on_the_model_velocity(digits_pipe):
    # Reference: Heun's method on dx/dt = v(x, t) over diffusers' flow-match grid: an Euler predictor to the
    # next time, then the step with the mean of the two slopes; the last step (to t = 0) is plain Euler.
    model, steps = digits_pipe.transformer, 3
    x = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(7))
    v = lambda x_, t: model(x_, torch.full((1,), t), torch.tensor([5]))  # noqa: E731
    grid = [*np.linspace(1.0, 1e-3, steps).tolist(), 0.0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        slope = v(x, t)
        if t_next == 0.0:
            x = x + (t_next - t) * slope
        else:
            predicted = x + (t_next - t) * slope
            x = x + (t_next - t) * (slope + v(predicted, t_next)) / 2
    expected = (x.clamp(-1, 1) + 1) / 2
    pipe = DiTMoEPipeline(model, scheduler=make_scheduler("rf", "flow_match_heun"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[5], num_inference_steps=steps, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(7), output_type="pt")
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
    with pytest.raises(ValueError, match="samples with .flow_match_euler. or .flow_match_heun., not .ddim."):
        DiTMoEPipeline.from_pretrained(f"local-dir:{tmp_path}", scheduler="ddim")


# ------------------------------------------------------------------------------------------ default sampling


@contextlib.contextmanager
def recorded_sampling(model):
    """What the denoising loop asked of ``model`` while the block runs: "forwards", the number of model
    evaluations (a guided step is one forward of both halves), and "scales", the guidance scale of every guided
    one (unguided steps call ``model(...)`` directly)."""
    seen = {"forwards": 0, "scales": []}
    forward, forward_with_cfg = model.forward, model.forward_with_cfg

    def counted(*args, **kwargs):
        seen["forwards"] += 1
        return forward(*args, **kwargs)

    def guided(x, t, y, scale, **kwargs):
        seen["scales"].append(scale)
        return forward_with_cfg(x, t, y, scale, **kwargs)

    model.forward, model.forward_with_cfg = counted, guided
    try:
        yield seen
    finally:
        del model.forward, model.forward_with_cfg


def evaluations(scheduler: str, steps: int) -> int:
    """Model evaluations of a sampling run: Euler one per step; Heun two per step but the last (to t = 0)."""
    return {"flow_match_euler": steps, "flow_match_heun": 2 * steps - 1}[scheduler]


def assert_sampled_with(pipe, request: dict, scheduler: str, steps: int, guidance: float, **arguments):
    with recorded_sampling(pipe.transformer) as seen:
        pipe(**request, output_type="pt", generator=torch.Generator().manual_seed(0), **arguments)
    assert type(pipe.scheduler) is type(make_scheduler("rf", scheduler))
    assert seen["forwards"] == evaluations(scheduler, steps)
    assert seen["scales"] == ([] if guidance == 1 else [guidance] * evaluations(scheduler, steps))


BUNDLED_IMAGES = {"dit_moe_digits": dict(class_labels=[7]), "dit_dense_digits": dict(class_labels=["3"]),
                  "dit_moe_shapes": dict(prompt="a large red circle on the left")}


@pytest.mark.parametrize("name", BUNDLED_IMAGES)
def test_a_bundled_model_samples_as_its_metadata_recommends_unless_told_otherwise(name):
    # The recommendation is the bundled model's own metadata (from the README's sweep), not the fallback.
    recommended = get_pretrained_cfg(name).metadata["sampling"]
    assert set(recommended) == set(DEFAULT_SAMPLING) and recommended != DEFAULT_SAMPLING
    pipe = DiTMoEPipeline.from_pretrained(name)
    pipe.set_progress_bar_config(disable=True)
    request = BUNDLED_IMAGES[name]
    assert_sampled_with(pipe, request, recommended["scheduler"], recommended["num_inference_steps"],
                        recommended["guidance_scale"])
    # None is "not passed"; explicit arguments win, one at a time or all together.
    assert_sampled_with(pipe, request, recommended["scheduler"], recommended["num_inference_steps"],
                        recommended["guidance_scale"], num_inference_steps=None, guidance_scale=None)
    assert_sampled_with(pipe, request, recommended["scheduler"], 3, recommended["guidance_scale"],
                        num_inference_steps=3)
    assert_sampled_with(pipe, request, recommended["scheduler"], recommended["num_inference_steps"], 1.0,
                        guidance_scale=1)
    other = "flow_match_heun" if recommended["scheduler"] == "flow_match_euler" else "flow_match_euler"
    heun = DiTMoEPipeline.from_pretrained(name, scheduler=other)
    heun.set_progress_bar_config(disable=True)
    assert_sampled_with(heun, request, other, 2, 2.5, num_inference_steps=2, guidance_scale=2.5)


def test_the_bundled_image_models_recommend_the_swept_settings():
    # README "Measured", the defaults sweep. Digits: Euler, 25 steps, guidance 1.25 (both models 99.2% right,
    # recall 83-86%, diversity 0.95x real). Shapes (6000 steps): Euler, 25 steps, guidance 1.5 (98.6% of 1000
    # prompts right, recall 73%, the lowest FD).
    for name, guidance in (("dit_moe_digits", 1.25), ("dit_dense_digits", 1.25), ("dit_moe_shapes", 1.5)):
        assert get_pretrained_cfg(name).metadata["sampling"] == {
            "scheduler": "flow_match_euler", "num_inference_steps": 25, "guidance_scale": guidance}


def test_an_exported_models_metadata_sets_the_defaults_and_a_bad_one_is_refused(tmp_path):
    model = randomise(create_model("dit_moe_digits", **TINY), seed=5).eval()
    sampling = {"scheduler": "flow_match_heun", "num_inference_steps": 3, "guidance_scale": 1.5}
    save_pretrained(model, tmp_path, "dit_moe_digits", TINY, {"objective": "rf", "sampling": sampling})
    pipe = DiTMoEPipeline.from_pretrained(f"local-dir:{tmp_path}")
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.default_num_inference_steps, pipe.default_guidance_scale) == (3, 1.5)
    assert_sampled_with(pipe, dict(class_labels=[2]), "flow_match_heun", 3, 1.5)
    pipe.default_num_inference_steps, pipe.default_guidance_scale = 2, 1.0  # per pipeline, as max_batch_size
    assert_sampled_with(pipe, dict(class_labels=[2]), "flow_match_heun", 2, 1.0)
    # Only some keys: the others fall back to DEFAULT_SAMPLING.
    save_pretrained(model, tmp_path, "dit_moe_digits", TINY, {"objective": "rf", "sampling": {"guidance_scale": 2}})
    partial = DiTMoEPipeline.from_pretrained(f"local-dir:{tmp_path}")
    assert (partial.default_num_inference_steps, partial.default_guidance_scale) == (30, 2.0)
    assert type(partial.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"

    for bad, message in [
        ({"guidance_scale": -1}, r"metadata \"sampling\" \{'guidance_scale': -1\} is invalid: guidance_scale must "),
        ({"num_inference_steps": 2.5}, "is invalid: num_inference_steps must be a positive integer, got 2.5"),
        ({"scheduler": 3}, "is invalid: scheduler must be a scheduler name, got 3"),
        ({"steps": 20}, "must be an object with any of the keys scheduler, num_inference_steps, guidance_scale"),
        ({"scheduler": "ddim"}, "recommends an unusable scheduler: a rectified-flow model samples with"),
    ]:
        save_pretrained(model, tmp_path, "dit_moe_digits", TINY, {"objective": "rf", "sampling": bad})
        with pytest.raises(ValueError, match=message):
            DiTMoEPipeline.from_pretrained(f"local-dir:{tmp_path}")


def test_none_means_the_pipelines_default(digits_pipe):
    # A model without a recommendation (no pretrained metadata): DEFAULT_SAMPLING.
    assert (digits_pipe.default_num_inference_steps, digits_pipe.default_guidance_scale) == (30, 4.0)
    assert_sampled_with(digits_pipe, dict(class_labels=[1]), "flow_match_euler", 30, 4.0, guidance_scale=None)


# ----------------------------------------------------------------------------------------------- freezing, VAE


def test_pipeline_freezes_its_models_and_refreezes_after_to(monkeypatch):
    from moezoo.kernels import cpu_backend, pack_expert_weights

    # packing is oneDNN's: on wherever this torch has it, whichever GEMM library the CPU kind picks by default
    monkeypatch.setattr(cpu_backend, "ONEDNN_GEMMS", cpu_backend._onednn_linear_available())
    model = randomise(create_model("dit_moe_digits", **TINY))
    if pack_expert_weights(model.blocks[0].moe.w_in, model.blocks[0].moe.w_out) is None:
        pytest.skip("no oneDNN packing in this torch build")
    pipe = DiTMoEPipeline(model)
    assert all(block.moe.frozen for block in model.blocks)
    pipe.to(dtype=torch.float64)  # nothing to pack in float64: computed on the live weights
    assert not any(block.moe.frozen for block in model.blocks)
    pipe.to(dtype=torch.float32)
    assert all(block.moe.frozen for block in model.blocks)
    pipe.unfreeze()
    assert not any(block.moe.frozen for block in model.blocks)


def test_pipeline_output_follows_a_data_edit_after_unfreeze():
    pipe = DiTMoEPipeline(randomise(create_model("dit_moe_digits", **TINY)))
    pipe.set_progress_bar_config(disable=True)
    def run(p):
        return p(class_labels=[3], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))

    before = run(pipe).images
    for block in pipe.transformer.blocks:
        block.moe.w_out.data.mul_(3.0)
    pipe.unfreeze()
    fresh = DiTMoEPipeline(pipe.transformer)  # a new pipeline packs the edited weights
    fresh.set_progress_bar_config(disable=True)
    after, again = run(pipe).images, run(fresh).images
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, again, **fp_tolerance(torch.float32, 256, layers=4))


class _ScaledIdentityVAE(torch.nn.Module):
    """A stand-in AutoencoderKL: decode returns its input, and its config says how latents were scaled."""

    def __init__(self, scaling_factor: float):
        super().__init__()
        self.config = type("Config", (), {"scaling_factor": scaling_factor})()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so the pipeline can read a device and dtype

    def decode(self, latents):
        return type("Decoded", (), {"sample": latents})()


def test_latents_are_unscaled_by_the_vaes_own_scaling_factor(digits_pipe):
    pipe = DiTMoEPipeline(digits_pipe.transformer, vae=_ScaledIdentityVAE(0.25))
    latents = torch.full((1, 1, 16, 16), 0.1)
    torch.testing.assert_close(pipe._decode(latents), latents / 0.25)
    pipe.vae.config = object()
    with pytest.raises(ValueError, match="scaling_factor"):
        pipe._decode(latents)
