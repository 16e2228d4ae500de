"""DiTMoEVideoPipeline and the video export helpers.

The sampler is checked against a hand-written Euler loop over diffusers' flow-match sigmas (with classifier-free
guidance written out), the outputs' layouts against the final latent, the files against what PyAV and PIL
decode from them.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from moezoo.pipelines.dit_moe_video import DiTMoEVideoPipeline, DiTMoEVideoPipelineOutput
from moezoo.pipelines.video_export import export_to_gif, export_to_video
from moezoo.zoo import create_model, save_pretrained
from tolerance import fp_tolerance

PROMPTS = ["a red square moving left", "a blue circle moving up"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("test_dit_moe_video").eval()
    with torch.no_grad():  # non-zero adaLN / output layers, so the model's prediction depends on its inputs
        for name, p in m.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(0, 0.2)
    return m


@pytest.fixture()
def pipe(model):
    p = DiTMoEVideoPipeline(model)
    p.set_progress_bar_config(disable=True)
    return p


def hand_sampler(model, prompts, steps, guidance, seed, frames):
    """Flow-match Euler written out: x <- x + (sigma_next - sigma) * v, v guided as u + s (c - u)."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.tolist()
    x = torch.randn(len(prompts), frames, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        emb = model.encode_text(prompts)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((len(prompts),), sigma)
            cond = model(x, t, None, emb)
            v = cond if guidance == 1.0 else model(x, t, None, torch.zeros_like(emb)) + guidance * (
                cond - model(x, t, None, torch.zeros_like(emb)))
            x = x + (sigma_next - sigma) * v
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 1, 3, 4, 2).numpy()


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampler_matches_a_hand_written_euler_loop(pipe, model, guidance):
    out = pipe(prompt=PROMPTS, num_frames=3, num_inference_steps=4, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(5), output_type="np")
    assert isinstance(out, DiTMoEVideoPipelineOutput)
    assert out.frames.shape == (2, 3, 8, 8, 3) and out.frames.dtype == np.float32
    np.testing.assert_allclose(out.frames, hand_sampler(model, PROMPTS, 4, guidance, 5, 3), atol=2e-5)


def test_output_types_routing_and_per_clip_generators(pipe, model):
    kwargs = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=2.0)
    np_out = pipe(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="np",
                  return_routing=True)
    assert np_out.frames.shape == (2, 4, 8, 8, 3)  # num_frames=None: the model's 4
    assert 0.0 <= np_out.frames.min() and np_out.frames.max() <= 1.0
    maps = np_out.routing_maps
    assert len(maps) == model.config.depth
    assert all(m.shape == (2, 4, 4, 4) and m.dtype == np.int64 for m in maps)
    assert all(0 <= m.min() and m.max() < model.config.num_experts for m in maps)
    # clip 1 of the batch is what its own generator gives alone
    alone = pipe(prompt=PROMPTS[1:], num_inference_steps=2, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(2), output_type="np")
    np.testing.assert_allclose(np_out.frames[1], alone.frames[0], atol=1e-5)

    pt = pipe(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="pt").frames
    assert pt.shape == (2, 4, 3, 8, 8)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), np_out.frames, atol=1e-6)
    pil = pipe(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="pil").frames
    assert len(pil) == 2 and len(pil[0]) == 4 and pil[0][0].size == (8, 8)
    np.testing.assert_array_equal(np.asarray(pil[1][3]), np.round(np_out.frames[1, 3] * 255).astype(np.uint8))
    frames, routing = pipe(**kwargs, return_dict=False, return_routing=True)
    assert frames.shape == (2, 4, 8, 8, 3) and len(routing) == model.config.depth


@pytest.mark.parametrize("bad, message", [
    (dict(num_frames=0), "num_frames must be an integer >= 1"),
    (dict(num_frames=2.5), "num_frames must be an integer >= 1"),
    (dict(height=7), "height=7 is not divisible by the patch size 2"),
    (dict(width=12), "generates 8x8 frames"),
    (dict(generator=[torch.Generator()] * 3), "3 generators for 2 outputs"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(output_type="gif"), "unknown output_type"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale="3"), "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale=True), "guidance_scale must be a finite number >= 0"),
    (dict(max_batch_size=0), "max_batch_size must be a positive integer"),
])
def test_bad_arguments_fail_before_any_compute(pipe, monkeypatch, bad, message):
    def no_compute(*args, **kwargs):
        raise AssertionError("computed before checking the arguments")

    monkeypatch.setattr(pipe.transformer, "forward", no_compute)
    monkeypatch.setattr(pipe.transformer, "encode_text", no_compute)
    with pytest.raises(ValueError, match=message):
        pipe(prompt=PROMPTS, **bad)


def test_many_clips_run_in_chunks_with_the_same_result(pipe, model):
    prompts = [*PROMPTS, "a green triangle moving down"]
    sizes = []
    forward = model.forward  # wrapped on the instance: guidance calls self.forward, which hooks do not see
    model.forward = lambda x, *args, **kwargs: sizes.append(x.shape[0]) or forward(x, *args, **kwargs)

    def run(max_batch_size):
        return pipe(prompt=prompts, num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(20 + i) for i in range(3)], return_routing=True,
                    max_batch_size=max_batch_size)

    try:
        chunked = run(2)
    finally:
        del model.forward
    whole = run(3)
    assert sizes == [4, 4, 2, 2]  # chunks of 2 and 1 clips, [conditional; unconditional], two steps each
    assert DiTMoEVideoPipeline.max_batch_size == 4
    # Rounding from GEMM blocking over the batch, through 2 steps of a 2-layer model (MLP hidden 128).
    tolerance = fp_tolerance(torch.float32, 128, layers=2 * model.config.depth)
    torch.testing.assert_close(chunked.frames, whole.frames, **tolerance)
    assert chunked.frames.shape == (3, 4, 3, 8, 8)
    for chunked_map, whole_map in zip(chunked.routing_maps, whole.routing_maps, strict=True):
        assert chunked_map.shape == (3, 4, 4, 4)
        np.testing.assert_array_equal(chunked_map, whole_map)


def test_from_pretrained_loads_a_saved_video_model(tmp_path, model):
    save_pretrained(model, tmp_path, "test_dit_moe_video", {}, {"fps": 8}, dtype=torch.float16)
    pipe = DiTMoEVideoPipeline.from_pretrained(f"local-dir:{tmp_path}")
    assert type(pipe.transformer).__name__ == "DiTMoEVideo"
    w = pipe.transformer.blocks[0].moe.w_in
    torch.testing.assert_close(w, model.blocks[0].moe.w_in.half().float())


def test_the_video_pipeline_samples_as_the_models_metadata_recommends(tmp_path, model):
    sampling = {"scheduler": "flow_match_heun", "num_inference_steps": 2, "guidance_scale": 1.5}
    save_pretrained(model, tmp_path, "test_dit_moe_video", {}, {"objective": "rf", "sampling": sampling})
    pipe = DiTMoEVideoPipeline.from_pretrained(f"local-dir:{tmp_path}")
    pipe.set_progress_bar_config(disable=True)
    scales, forwards = [], []
    forward, forward_with_cfg = pipe.transformer.forward, pipe.transformer.forward_with_cfg
    pipe.transformer.forward = lambda x, *a, **k: forwards.append(x.shape[0]) or forward(x, *a, **k)
    pipe.transformer.forward_with_cfg = lambda x, t, y, scale, **k: scales.append(scale) or forward_with_cfg(
        x, t, y, scale, **k)
    try:
        pipe(prompt=PROMPTS[:1], generator=torch.Generator().manual_seed(0))
        assert forwards == [2, 2, 2] and scales == [1.5] * 3  # Heun, 2 steps: 3 guided evaluations
        forwards.clear()
        pipe(prompt=PROMPTS[:1], num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
        assert forwards == [1] and scales == [1.5] * 3  # explicit arguments win: one unguided evaluation
    finally:
        del pipe.transformer.forward, pipe.transformer.forward_with_cfg
    assert type(pipe.scheduler).__name__ == "FlowMatchHeunDiscreteScheduler"


def test_the_bundled_video_model_recommends_the_measured_setting():
    from moezoo.zoo import get_pretrained_cfg

    # README "Measured": bench/video_quality.py's setting, 30 Euler steps at guidance 4.
    recommended = get_pretrained_cfg("dit_moe_shapes_video").metadata["sampling"]
    assert recommended == {"scheduler": "flow_match_euler", "num_inference_steps": 30, "guidance_scale": 4.0}
    pipe = DiTMoEVideoPipeline.from_pretrained("dit_moe_shapes_video")
    assert (pipe.default_num_inference_steps, pipe.default_guidance_scale) == (30, 4.0)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler


def gradient_clip(frames=5, size=16) -> np.ndarray:
    """Flat colour per frame: H.264's chroma subsampling keeps flat areas exact up to rounding."""
    colours = np.linspace(0.1, 0.9, frames)
    return np.stack([np.full((size, size, 3), (c, 1 - c, 0.5), dtype=np.float32) for c in colours])


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = (stream.codec_context.name, stream.codec_context.pix_fmt, float(stream.average_rate))
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return info, frames


def test_export_to_video_writes_browser_playable_h264(tmp_path):
    clip = gradient_clip()
    path = export_to_video(clip, tmp_path / "out" / "clip.mp4", fps=8)
    assert path == str(tmp_path / "out" / "clip.mp4")
    (codec, pix_fmt, fps), frames = decode(path)
    assert (codec, pix_fmt, fps) == ("h264", "yuv420p", 8.0)
    assert frames.shape == (5, 16, 16, 3)
    assert np.abs(frames.astype(int) - np.round(clip * 255)).max() <= 4
    data = open(path, "rb").read()
    assert data[4:8] == b"ftyp" and 0 < data.find(b"moov") < data.find(b"mdat")  # mp4, index first (faststart)
    # odd sides padded to even, integer upscaling, PIL frames and torch clips accepted
    odd = np.zeros((2, 7, 9, 3), dtype=np.uint8)
    assert decode(export_to_video(odd, tmp_path / "odd.mp4"))[1].shape == (2, 8, 10, 3)
    assert decode(export_to_video(clip, tmp_path / "big.mp4", scale=3))[1].shape == (5, 48, 48, 3)
    pil = [Image.fromarray(np.round(f * 255).astype(np.uint8)) for f in clip]
    assert decode(export_to_video(pil, tmp_path / "pil.mp4"))[1].shape == (5, 16, 16, 3)
    torch_clip = torch.from_numpy(clip).permute(0, 3, 1, 2)
    assert decode(export_to_video(torch_clip, tmp_path / "pt.mp4"))[1].shape == (5, 16, 16, 3)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "incomplete" in p.name) == []


def test_export_rejects_batches_and_bad_settings_without_writing(tmp_path):
    target = tmp_path / "x.mp4"
    with pytest.raises(ValueError, match="for a batch"):
        export_to_video(np.zeros((2, 3, 8, 8, 3), np.float32), target)
    with pytest.raises(ValueError, match="fps must be a positive number"):
        export_to_video(gradient_clip(), target, fps=0)
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        export_to_gif(gradient_clip(), tmp_path / "x.gif", scale=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer, name, message", [
    (export_to_video, "clip.gif",
     r"export_to_video writes H.264 MP4 files: the path must end in .mp4, got '.*clip.gif'"),
    (export_to_video, "clip.avi", r"must end in .mp4, got '.*clip.avi'; for a GIF use export_to_gif"),
    (export_to_video, "clip", r"must end in .mp4, got '.*clip'"),
    (export_to_gif, "clip.mp4", r"export_to_gif writes GIF files: the path must end in .gif, got '.*clip.mp4'; for an "
                                r"MP4 use export_to_video"),
    (export_to_gif, "clip.png", "must end in .gif"),
])
def test_export_refuses_an_extension_of_another_format_without_writing(tmp_path, writer, name, message):
    with pytest.raises(ValueError, match=message):
        writer(gradient_clip(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_export_extensions_are_case_insensitive(tmp_path):
    (codec, _, _), frames = decode(export_to_video(gradient_clip(), tmp_path / "CLIP.MP4"))
    assert codec == "h264" and frames.shape == (5, 16, 16, 3)
    with Image.open(export_to_gif(gradient_clip(), tmp_path / "clip.GIF")) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5


def test_export_to_gif(tmp_path):
    clip = (np.arange(4)[:, None, None, None] * np.ones((4, 6, 6, 3)) * 60).astype(np.uint8)
    path = export_to_gif(clip, tmp_path / "clip.gif", fps=5, scale=2)
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.size == (12, 12)
        assert gif.info["duration"] == 200 and gif.info["loop"] == 0
        for f in range(4):
            gif.seek(f)
            assert tuple(gif.convert("RGB").getpixel((3, 3))) == (60 * f,) * 3


def test_image_and_video_pipelines_take_their_shared_arguments_in_one_order():
    import inspect

    from moezoo.pipelines import DiTMoEPipeline

    image = list(inspect.signature(DiTMoEPipeline.__call__).parameters)
    video = list(inspect.signature(DiTMoEVideoPipeline.__call__).parameters)
    shared = [name for name in image if name in video]
    assert [name for name in video if name in shared] == shared
    assert shared[:3] == ["self", "class_labels", "prompt"]
