"""The Gradio demo: every pipeline of the zoo in one app, with the experts made visible.

    python -m moezoo.app                   # or `make demo`: http://127.0.0.1:7860
    from moezoo.app import build_demo
    demo = build_demo()                    # a gr.Blocks; launch_demo(demo) serves it as `python -m moezoo.app`

One tab per entry of :data:`TABS`. A tab names a zoo model and a :class:`TabApp` kind (class -> image, text ->
image, text -> video, restoration, fusion, text -> audio); serving a new model of an existing kind is one new
entry. Each tab shows the pipeline's output and beside it, for a chosen MoE layer, which expert every patch (or
gate cell) went to and a bar chart of the load per expert (:mod:`moezoo.app.pictures`); the audio tab, whose
frames each use as many experts as they need, shows instead how many experts every frame used, under the clip's
spectrogram, and the mean per layer beside that of fixed speech and music prompts.

Listeners have explicit API names (``/digits``, ``/shapes``, ``/shapes_video``, ``/deweather``, ``/fusion``,
``/audio``), so the app can be scripted with ``gradio_client``. Every run of one model queues behind the
previous one (``concurrency_limit=1`` per model); bad input (an empty prompt, a word the audio model does not
know, a file that is not an image, a corrupt or enormous image, a fusion pair of different sizes, out-of-range
numbers) raises a ``gr.Error`` that says what was wrong and what is accepted, and the app keeps serving. A tab
whose weights are missing shows why instead of its controls.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import html
import logging
import math
import os
import shutil
import signal
import struct
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from moezoo.encoders.audio import F_MAX, denormalize_log_mel
from moezoo.pipelines import AudioPipeline, DiTMoEPipeline, DiTMoEVideoPipeline, export_to_video, export_to_wav
from moezoo.pipelines.deweather import DeweatherPipeline
from moezoo.pipelines.dit_moe import recommended_sampling
from moezoo.pipelines.fusion import FusionPipeline
from moezoo.pipelines.visual_qa import VisualQAPipeline
from moezoo.training.datasets.audio import caption_words, parse_audio_caption
from moezoo.zoo import get_pretrained_cfg
from moezoo.zoo.layers import routed_blocks

from .pictures import (
    DYNAMIC_RANGE_DB,
    expert_labels,
    expert_shares,
    expert_colors,
    load_chart,
    mean_experts_chart,
    modality_share_chart,
    routing_map_picture,
    spectrogram_with_experts,
)

__all__ = ["Tab", "TABS", "TabApp", "ClassToImage", "TextToImage", "TextToVideo", "Restore", "Fuse", "TextToAudio", "SceneQA",
           "Layer", "build_demo", "launch_demo", "load_bundled"]

_logger = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
MAX_STEPS = 100
MAX_GUIDANCE = 15.0
MAX_TEMPERATURE = 2.0
MAX_PROMPT_CHARS = 300
# Uploads: larger files are refused by the server (launch_demo), larger images than this many pixels are
# refused before decoding, and images whose longer side exceeds the tab's max_side are scaled down.
MAX_UPLOAD_MB = 30
MAX_PIXELS = 40_000_000
DISPLAY_SIDE = 256  # tiny generated pictures (16 or 32 px) are enlarged to at least this, nearest neighbour
MEMO_SIZE = 8  # results kept per tab, so choosing another layer redraws instead of recomputing
ACCEPTED_IMAGES = "PNG, JPEG, WebP, BMP, GIF or TIFF"
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # the same, as PIL names them


# ----------------------------------------------------------------------------------------------------------
# What a tab runs: its MoE layers, its results
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One routed layer of a pipeline's network: its module name, computed and special experts, and the
    legend label of every expert (the block's own ``expert_labels()``: e.g. which modality it reads)."""

    name: str
    num_experts: int
    num_special: int = 0
    labels: tuple[str, ...] = ()


def moe_layers(pipe) -> list[Layer]:
    """Every routed block (MoE FFNs, MoH attention, FiLM and conv experts: anything on the routed-block base)
    of the pipeline's networks, in forward-definition order — the order of the routing maps the pipelines
    return."""
    layers = []
    for attribute in getattr(pipe, "_modules", ()):
        module = getattr(pipe, attribute, None)
        if isinstance(module, torch.nn.Module):
            layers += [Layer(name, block.num_experts, block.num_special, tuple(block.expert_labels()))
                       for name, block in routed_blocks(module)]
    return layers


@dataclass
class Result:
    """One run: the output component's value, the routing map of every layer for the shown sample
    ([h, w] or [F, h, w]; for audio the experts each frame used, [frames]), what the maps are drawn over (for
    audio the clip's mel levels in dB, [n_mels, frames]), and how long it took."""

    output: Any
    maps: list[np.ndarray]
    base: Any
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------------
# Input checks: every message says what was wrong and what is accepted
# ----------------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _is_whole_in(value, low: int, high: int) -> bool:
    return _is_number(value) and float(value).is_integer() and low <= value <= high


def checked_seed(seed) -> int:
    if not _is_whole_in(seed, 0, MAX_SEED):
        raise gr.Error(f"Seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}.")
    return int(seed)


def checked_steps(steps) -> int:
    if not _is_whole_in(steps, 1, MAX_STEPS):
        raise gr.Error(f"Steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}.")
    return int(steps)


def checked_guidance(guidance) -> float:
    if not _is_number(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise gr.Error(f"Guidance must be a number from 0 to {MAX_GUIDANCE:g} (1 = no guidance), got {guidance!r}.")
    return float(guidance)


def checked_temperature(temperature) -> float:
    if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise gr.Error(f"Temperature must be a number from 0 to {MAX_TEMPERATURE:g} (0 = always the likeliest code), "
                       f"got {temperature!r}.")
    return float(temperature)


def checked_top_k(top_k, num_codes: int) -> int | None:
    """Top-k as the pipeline takes it: a whole number of codes, or None (all codes) for 0."""
    if not _is_whole_in(top_k, 0, num_codes):
        raise gr.Error(f"Top-k must be a whole number from 0 to {num_codes} (0 = sample among all codes), "
                       f"got {top_k!r}.")
    return int(top_k) or None


def _text_to_number(value):
    """A number written as text ("3", " 2.0 ") as a float; anything else unchanged, for the checks to refuse."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def checked_prompt(prompt, example: str, ask: str = "describe what to draw") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise gr.Error(f"The prompt is empty: {ask}, e.g. \u201c{example}\u201d.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(f"The prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted.")
    return prompt.strip()


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels over white (dropping alpha would show whatever colour they happen to store)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} megapixels"


def too_many_pixels(what: str, name: str, size: tuple[int, int] | None) -> gr.Error:
    """The refusal of an image above MAX_PIXELS, naming its size (when known) and the limit."""
    limit = f"this demo accepts up to {_megapixels(MAX_PIXELS)}"
    if size is None:
        return gr.Error(f"{what} ({name}) has too many pixels; {limit}.")
    width, height = size
    return gr.Error(f"{what} ({name}) is {width}x{height} = {_megapixels(width * height)}; {limit}.")


def header_size(path) -> tuple[int, int] | None:
    """(width, height) of an image file of an accepted format, from its header alone, or None if none of them
    recognises it. For files that PIL's ``Image.open`` refuses as decompression bombs: its refusal names neither
    the size nor this demo's limit. A format's PIL plugin reads the header without decoding or checking the size;
    which plugin is found, as ``Image.open`` does, from the file's first bytes."""
    Image.init()  # registers the WebP and TIFF plugins too
    with open(path, "rb") as file:
        prefix = file.read(16)
        for format_name in ACCEPTED_FORMATS:
            factory, accept = Image.OPEN[format_name]
            if accept is not None and not accept(prefix):
                continue
            file.seek(0)
            try:
                return factory(file, str(path)).size
            except (SyntaxError, IndexError, TypeError, ValueError, OSError, struct.error,
                    Image.DecompressionBombError):  # what plugins raise for a header they cannot read
                return None
    return None


def open_upload(upload, what: str) -> Image.Image:
    """An uploaded image (a file path from gradio, or a PIL image / array in direct calls), fully decoded,
    EXIF-rotated, without alpha. Raises gr.Error for a missing, unreadable, corrupt or too large image.
    ``what`` names it in messages, e.g. "the photo"."""
    if upload is None:
        raise gr.Error(f"Upload {what} first ({ACCEPTED_IMAGES}).")
    what = what[0].upper() + what[1:]  # it starts the sentences below
    if isinstance(upload, np.ndarray):
        upload = Image.fromarray(upload)
    if isinstance(upload, Image.Image):
        return _flatten_alpha(upload)
    name = Path(str(upload)).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below 2x its limit
            image = Image.open(upload)
            if image.width * image.height > MAX_PIXELS:
                raise too_many_pixels(what, name, image.size)
            image = ImageOps.exif_transpose(image)
            image.load()
    except gr.Error:
        raise
    except UnidentifiedImageError as err:
        raise gr.Error(f"{what} ({name}) is not an image this demo can read; accepted: {ACCEPTED_IMAGES}.") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # PIL's own, higher limit
        raise too_many_pixels(what, name, header_size(upload)) from err
    except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged data: PIL raises all three
        raise gr.Error(f"{what} ({name}) is damaged and could not be decoded ({err}); try saving it again as PNG "
                       "or JPEG.") from err
    return _flatten_alpha(image)


def capped(images: Sequence[Image.Image], max_side: int, notes: list[str]) -> list[Image.Image]:
    """Scale images (all of one size) down so the longer side is at most ``max_side``, and say so."""
    width, height = images[0].size
    if max(width, height) <= max_side:
        return list(images)
    factor = max_side / max(width, height)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    notes.append(f"The input was {width}x{height}; it was scaled down to {size[0]}x{size[1]} (this CPU demo "
                 f"caps the longer side at {max_side} px).")
    return [image.resize(size, Image.LANCZOS) for image in images]


def enlarged(image: Image.Image, min_side: int = DISPLAY_SIDE) -> Image.Image:
    """Tiny pictures scaled up by a whole factor with nearest neighbour: browsers would blur them."""
    factor = max(1, min_side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def _fingerprint(*parts) -> str:
    """A key for a run's inputs: images by content, everything else by value."""
    digest = hashlib.sha1()
    for part in parts:
        if isinstance(part, Image.Image):
            digest.update(f"{part.mode}{part.size}".encode())
            digest.update(part.tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Tab kinds
# ----------------------------------------------------------------------------------------------------------


class TabApp:
    """One tab: a pipeline, the UI around it, and the functions its listeners call (also callable directly).

    Subclasses set ``pipeline_class``, build their inputs in :meth:`input_components` and their output in
    :meth:`output_component`, check inputs in :meth:`prepare` and call the pipeline in :meth:`compute`. Their
    ``run`` is the listener: the inputs as arguments in order, the MoE layer last, and a
    ``progress=gr.Progress(track_tqdm=True)`` default that makes gradio show the pipeline's own tqdm bar.
    ``run`` returns ``(output, routing map picture, load chart, markdown notes)``.
    """

    pipeline_class: ClassVar[type]
    button_label: ClassVar[str] = "Generate"
    # What the two routing pictures show (their accessible labels; the pictures carry their own titles).
    picture_label: ClassVar[str] = "Which expert each patch went to"
    chart_label: ClassVar[str] = "Expert load"

    def __init__(self, tab: "Tab", pipe):
        self.tab, self.pipe = tab, pipe
        self.layers = moe_layers(pipe)
        self._lock = threading.Lock()  # pipelines keep state (scheduler, routing records): one run at a time
        self._memo: OrderedDict[str, Result] = OrderedDict()

    # ------------------------------------------------------------------ UI
    def input_components(self) -> list[gr.components.Component]:
        raise NotImplementedError

    def output_component(self) -> gr.components.Component:
        return gr.Image(label="Output", type="pil", format="png", interactive=False, height=320)

    def examples(self, folder: Path) -> list[list]:
        """Example rows (values for every input, the layer last); files go into ``folder``."""
        return []

    def visible_example_columns(self) -> list[int]:
        return [0]

    @property
    def default_layer(self) -> int:
        return self.tab.default_layer if self.tab.default_layer is not None else len(self.layers) // 2

    def layer_dropdown(self) -> gr.Dropdown:
        choices = [(f"{i}: {layer.name} ({layer.num_experts} experts)", i) for i, layer in enumerate(self.layers)]
        dropdown = gr.Dropdown(choices=choices, value=self.default_layer if choices else None,
                               label="MoE layer shown", interactive=bool(choices))
        # gradio's API schema types every Dropdown as a string, so gradio_client sends the layer as "3", which
        # gradio would refuse as not one of the int choices before the listener runs. Checking it first turns
        # "3" into 3 and gives anything else this app's message. (Wrapped on the instance: see image_input.)
        choose = dropdown.preprocess
        dropdown.preprocess = lambda payload: choose(self._checked_layer(payload))
        return dropdown

    # ------------------------------------------------------------------ running
    def prepare(self, *values) -> tuple[tuple, list[str]]:
        """Check and normalise the inputs (raising gr.Error): the values :meth:`compute` takes, and notes for
        the user about what was changed (e.g. an image scaled down)."""
        raise NotImplementedError

    def compute(self, *prepared) -> Result:
        raise NotImplementedError

    def _run(self, values: tuple, layer) -> tuple:
        """Check the inputs, compute (or reuse the result of the same inputs), draw the pictures."""
        layer = self._checked_layer(layer)
        prepared, notes = self.prepare(*values)
        key = _fingerprint(*prepared)
        with self._lock:
            result = self._memo.get(key)
            if result is None:
                start = time.perf_counter()
                try:
                    result = self.compute(*prepared)
                except gr.Error:
                    raise
                except (ValueError, TypeError) as err:  # the pipelines' own argument checks
                    raise gr.Error(str(err)) from err
                except Exception as err:
                    _logger.exception("%s failed", self.tab.model)
                    raise gr.Error(f"{self.tab.title} failed: {type(err).__name__}: {err}") from err
                result.seconds = time.perf_counter() - start
                self._memo[key] = result
                if len(self._memo) > MEMO_SIZE:
                    self._memo.popitem(last=False)
            else:
                self._memo.move_to_end(key)
        for note in notes:
            gr.Warning(note)
        picture, chart, text = self.routing_panel(result, layer, notes)
        return result.output, picture, chart, text

    def _checked_layer(self, layer) -> int | None:
        """The MoE layer to show: a whole number in range, also written as text ("3": what the API schema
        advertises); None means the default layer."""
        if not self.layers:
            return None
        if layer is None:
            return self.default_layer
        number = _text_to_number(layer)
        if not _is_whole_in(number, 0, len(self.layers) - 1):
            raise gr.Error(f"MoE layer must be a whole number from 0 to {len(self.layers) - 1}, got {layer!r}.")
        return int(number)

    def routing_panel(self, result: Result, layer: int | None, notes: Sequence[str] = ()) -> tuple:
        """(routing map picture, load chart, markdown) of one layer of a result."""
        notes = [f"*{note}*" for note in notes]
        if layer is None or not result.maps:
            return None, None, "\n\n".join([*notes, f"`{self.tab.model}` has no MoE layers to show."])
        self._check_maps(result)
        info, map_ = self.layers[layer], result.maps[layer]
        num_ids = info.num_experts + info.num_special
        labels = list(info.labels) or expert_labels(info.num_experts, info.num_special)
        unit = self.tab.unit
        picture = routing_map_picture(map_, info.num_experts, result.base, labels, info.num_special,
                                      title=f"Layer {layer}: the first-choice expert of each of the {map_.size} {unit}")
        shares = expert_shares(map_, num_ids)
        chart = load_chart(shares, labels, info.num_experts, title=f"Layer {layer}: expert load, % of {unit} (top-1)")
        busiest = int(shares.argmax())
        idle = [labels[e].split(" ")[0] for e in range(info.num_experts) if shares[e] == 0]
        text = (f"**Layer {layer}** (`{info.name}`), {info.num_experts} experts. Busiest: **{labels[busiest]}**, the "
                f"first choice of {shares[busiest]:.0%} of the "
                f"{map_.size} {unit}"
                + (f"; unused: {', '.join(idle)}" if idle else "; every expert used")
                + f". Computed in {result.seconds:.2f} s on {self.pipe.device.type.upper()}.")
        return picture, chart, "\n\n".join([*notes, text])

    def _check_maps(self, result: Result) -> None:
        if len(result.maps) != len(self.layers):
            raise gr.Error(f"{self.tab.model} returned {len(result.maps)} routing maps for {len(self.layers)} MoE "
                           "layers; the pipeline and the model disagree.")


def seed_input() -> gr.Number:
    return gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")


def guidance_input(default: float) -> gr.Slider:
    return gr.Slider(0, MAX_GUIDANCE, value=default, step=0.25, label="Guidance",
                     info="classifier-free guidance; 1 = none")


class _Generation(TabApp):
    """Shared by the diffusion tabs: seed, steps and guidance controls and their checks."""

    def sampling_controls(self) -> list[gr.components.Component]:
        return [seed_input(), gr.Slider(1, MAX_STEPS, value=self.tab.steps, step=1, label="Steps"),
                guidance_input(self.tab.guidance)]

    def visible_example_columns(self) -> list[int]:
        return [0, 1]

    def checked_sampling(self, seed, steps, guidance) -> tuple[int, int, float]:
        return checked_seed(seed), checked_steps(steps), checked_guidance(guidance)

    @staticmethod
    def sampling(seed: int, steps: int, guidance: float) -> dict:
        return dict(generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                    guidance_scale=guidance)


class ClassToImage(_Generation):
    """A class-conditional DiT-MoE: pick a class, get a picture."""

    pipeline_class = DiTMoEPipeline

    def input_components(self):
        names = self.pipe.label_names
        return [gr.Dropdown(choices=names, value=names[0], label="Class"), *self.sampling_controls()]

    def examples(self, folder):
        names = self.pipe.label_names
        return [[names[c % len(names)], seed, self.tab.steps, self.tab.guidance, self.default_layer]
                for c, seed in self.tab.examples]

    def run(self, label, seed, steps, guidance, layer=None, progress=gr.Progress(track_tqdm=True)):
        return self._run((label, seed, steps, guidance), layer)

    def prepare(self, label, seed, steps, guidance):
        if label not in self.pipe.label_names:
            raise gr.Error(f"Unknown class {label!r}; accepted: {', '.join(self.pipe.label_names)}.")
        return (label, *self.checked_sampling(seed, steps, guidance)), []

    def compute(self, label, seed, steps, guidance):
        out = self.pipe(class_labels=[label], return_routing=True, **self.sampling(seed, steps, guidance))
        image = out.images[0]
        return Result(enlarged(image), [m[0] for m in out.routing_maps], image)


class TextToImage(_Generation):
    """A text-conditioned DiT-MoE: type a prompt, get a picture."""

    pipeline_class = DiTMoEPipeline

    def input_components(self):
        example = self.tab.examples[0][0] if self.tab.examples else ""
        return [gr.Textbox(value=example, label="Prompt", placeholder=example, max_lines=2),
                *self.sampling_controls()]

    def examples(self, folder):
        return [[prompt, seed, self.tab.steps, self.tab.guidance, self.default_layer]
                for prompt, seed in self.tab.examples]

    def run(self, prompt, seed, steps, guidance, layer=None, progress=gr.Progress(track_tqdm=True)):
        return self._run((prompt, seed, steps, guidance), layer)

    def prepare(self, prompt, seed, steps, guidance):
        example = self.tab.examples[0][0] if self.tab.examples else "a red circle"
        return (checked_prompt(prompt, example), *self.checked_sampling(seed, steps, guidance)), []

    def compute(self, prompt, seed, steps, guidance):
        out = self.pipe(prompt=[prompt], return_routing=True, **self.sampling(seed, steps, guidance))
        image = out.images[0]
        return Result(enlarged(image), [m[0] for m in out.routing_maps], image)


class TextToVideo(TextToImage):
    """A text-to-video DiT-MoE: a prompt gives a short mp4; the routing map has one panel per frame."""

    pipeline_class = DiTMoEVideoPipeline

    def output_component(self):
        return gr.Video(label="Output", format="mp4", interactive=False, autoplay=True, loop=True, height=320)

    def compute(self, prompt, seed, steps, guidance):
        out = self.pipe(prompt=[prompt], output_type="np", return_routing=True,
                        **self.sampling(seed, steps, guidance))
        frames = out.frames[0]  # [F, H, W, C] in [0, 1]
        scale = max(1, DISPLAY_SIDE // max(frames.shape[1:3]))
        path = Path(_session_folder()) / "videos" / f"{self.tab.api_name}-{time.time_ns()}.mp4"
        export_to_video(frames, path, fps=self.tab.fps, scale=scale)
        return Result(str(path), [m[0] for m in out.routing_maps], frames)


class Restore(TabApp):
    """Image restoration (deweathering): upload a photo, compare before and after."""

    pipeline_class = DeweatherPipeline
    button_label = "Restore"

    def input_components(self):
        return [image_input(label="Photo with rain, raindrops, snow or haze", height=320)]

    def output_component(self):
        return gr.ImageSlider(label="Before / after", type="pil", format="png", interactive=False, height=320)

    def examples(self, folder):
        return [[path, self.default_layer] for path in self.tab.examples(folder)] if self.tab.examples else []

    def run(self, image, layer=None, progress=gr.Progress(track_tqdm=True)):
        return self._run((image,), layer)

    def prepare(self, image):
        notes: list[str] = []
        image = open_upload(image, "the photo").convert("RGB")
        return tuple(capped([image], self.tab.max_side, notes)), notes

    def compute(self, image):
        out = self.pipe(image, return_routing=True)
        return Result((image, out.images[0]), [maps[0] for maps in out.routing_maps], image)


class Fuse(TabApp):
    """Infrared + visible fusion: upload a registered pair, get one fused picture."""

    pipeline_class = FusionPipeline
    button_label = "Fuse"

    def input_components(self):
        return [image_input(label="Infrared", height=240), image_input(label="Visible (same size)", height=240)]

    def output_component(self):
        return gr.Image(label="Fused", type="pil", format="png", interactive=False, height=320)

    def examples(self, folder):
        return [[ir, vis, self.default_layer] for ir, vis in self.tab.examples(folder)] if self.tab.examples else []

    def visible_example_columns(self):
        return [0, 1]

    def run(self, infrared, visible, layer=None, progress=gr.Progress(track_tqdm=True)):
        return self._run((infrared, visible), layer)

    def prepare(self, infrared, visible):
        notes: list[str] = []
        infrared, visible = open_upload(infrared, "the infrared image"), open_upload(visible, "the visible image")
        if infrared.size != visible.size:
            raise gr.Error(f"The infrared image is {infrared.width}x{infrared.height} but the visible image is "
                           f"{visible.width}x{visible.height} (width x height): a pair must be registered to the "
                           "same size. This demo does not resize or crop.")
        if infrared.mode != "L":
            notes.append("The infrared image was converted to greyscale (the model reads one infrared channel).")
            infrared = infrared.convert("L")
        if visible.mode not in ("L", "RGB"):
            visible = visible.convert("RGB")
        return tuple(capped([infrared, visible], self.tab.max_side, notes)), notes

    def compute(self, infrared, visible):
        out = self.pipe(infrared, visible, return_routing=True)
        fused = out.images[0]
        return Result(fused, [m[0] for m in out.routing_maps], fused)


class TextToAudio(TabApp):
    """Text to speech or music with UniMoE-Audio: a prompt gives a short clip to play. Its dynamic-capacity MoE
    lets every audio frame take as many experts as the top-p rule needs (null experts included), so instead of
    a map of which expert won, the pictures show the clip's spectrogram with, under it frame by frame, how many
    experts each frame used in the chosen layer, and the mean experts per token of every layer beside those of
    fixed speech and music prompts (:meth:`reference_means`)."""

    pipeline_class = AudioPipeline
    picture_label = "Spectrogram, and the experts each frame used"
    chart_label = "Mean experts per token by layer"
    default_temperature: ClassVar[float] = AudioPipeline.DEFAULT_TEMPERATURE  # the pipeline's (and the bench's)
    default_top_k: ClassVar[int] = AudioPipeline.DEFAULT_TOP_K
    # The reference means: these prompts (words; notes and chords across the timbres), prompt i with seed
    # reference_seed + i, at the tab's default guidance, temperature and top-k.
    reference_prompts: ClassVar[dict[str, tuple[str, ...]]] = {
        "speech": ("the word yes", "the word seven", "the word left", "the word stop"),
        "music": ("a plucked C4 note", "a sine A3 note", "a C major chord on a square wave",
                  "a A minor chord on a sawtooth wave"),
    }
    reference_seed: ClassVar[int] = 0

    def __init__(self, tab: "Tab", pipe):
        super().__init__(tab, pipe)
        self._references: dict[str, np.ndarray] | None = None

    @property
    def example_prompt(self) -> str:
        return self.tab.examples[0][0] if self.tab.examples else self.reference_prompts["speech"][0]

    @property
    def num_codes(self) -> int:
        return self.pipe.model.config.codebook_size

    def input_components(self):
        example = self.example_prompt
        return [gr.Textbox(value=example, label="Prompt", placeholder=example, max_lines=2), seed_input(),
                guidance_input(self.tab.guidance),
                gr.Slider(0, MAX_TEMPERATURE, value=self.default_temperature, step=0.05, label="Temperature",
                          info="0 = always the likeliest code"),
                gr.Slider(0, self.num_codes, value=min(self.default_top_k, self.num_codes), step=1, label="Top-k",
                          info="sample among the k likeliest codes; 0 = all")]

    def output_component(self):
        return gr.Audio(label="Generated audio", type="filepath", format="wav", interactive=False)

    def examples(self, folder):
        return [[prompt, seed, self.tab.guidance, self.default_temperature, min(self.default_top_k, self.num_codes),
                 self.default_layer] for prompt, seed in self.tab.examples]

    def visible_example_columns(self):
        return [0, 1]

    def run(self, prompt, seed, guidance, temperature, top_k, layer=None, progress=gr.Progress(track_tqdm=True)):
        return self._run((prompt, seed, guidance, temperature, top_k), layer)

    def prepare(self, prompt, seed, guidance, temperature, top_k):
        prompt = self.checked_audio_prompt(prompt)
        notes = []
        try:
            parse_audio_caption(prompt)
        except ValueError as err:
            notes.append(f"This prompt is not one of the captions the model trained on ({err}); it generates "
                         "something all the same.")
        return (prompt, checked_seed(seed), checked_guidance(guidance), checked_temperature(temperature),
                checked_top_k(top_k, self.num_codes)), notes

    def checked_audio_prompt(self, prompt) -> str:
        """A prompt of the model's words, at most as many as it reads."""
        prompt = checked_prompt(prompt, self.example_prompt, ask="say what to hear")
        model = self.pipe.model
        examples = ", ".join(f"\u201c{p}\u201d" for p in [p for p, _ in self.tab.examples[:3]] or [self.example_prompt])
        unknown = model.unknown_words(prompt)
        if unknown:
            raise gr.Error(f"Unknown word{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: this model "
                           f"knows only {', '.join(model.config.vocabulary)} (prompts like {examples}).")
        words, most = caption_words(prompt), model.config.max_text_tokens
        if not words:
            raise gr.Error(f"The prompt has no words, only punctuation: say what to hear, e.g. {examples}.")
        if len(words) > most:
            raise gr.Error(f"The prompt has {len(words)} words; this model reads at most {most}.")
        return prompt

    def compute(self, prompt, seed, guidance, temperature, top_k):
        out = self.pipe(prompt, guidance_scale=guidance, temperature=temperature, top_k=top_k,
                        generator=torch.Generator().manual_seed(seed), return_routing=True)
        path = Path(_session_folder()) / "audio" / f"{self.tab.api_name}-{time.time_ns()}.wav"
        export_to_wav(out.audios[0], path, out.sampling_rate)
        # The codec's mel is what the vocoder turned into sound: one column per generated frame, so the
        # spectrogram and the routing share one time axis.
        with torch.no_grad():
            log_mel = self.pipe.model.codec.decode(torch.as_tensor(out.codes[:1], device=self.pipe.device))[0]
        level_db = (20 * torch.log10(denormalize_log_mel(log_mel.float()))).cpu().numpy()
        return Result(str(path), [counts[0] for counts in out.experts_per_token], level_db)

    def routing_panel(self, result: Result, layer: int | None, notes: Sequence[str] = ()) -> tuple:
        """(spectrogram with the experts per frame of one layer, mean experts by layer chart, markdown)."""
        if layer is None or not result.maps:
            return super().routing_panel(result, layer, notes)
        self._check_maps(result)
        info, counts = self.layers[layer], result.maps[layer]
        pool, mean = info.num_experts + info.num_special, float(counts.mean())
        picture = spectrogram_with_experts(
            result.base, counts, pool, self.pipe.frame_rate, max_hz=F_MAX,
            title=f"Above: the clip's mel spectrogram (its loudest {DYNAMIC_RANGE_DB:g} dB).\n"
                  f"Below: experts each of the {counts.size} frames used in layer {layer}, null experts "
                  f"included (dashed: mean {mean:.2f}).")
        references, reference_seconds = self.reference_means()
        chart = mean_experts_chart({"this prompt": [m.mean() for m in result.maps], **references}, highlight=layer,
                                   title="Mean experts per token, by layer")
        used = range(int(counts.min()), int(counts.max()) + 1)
        shares = ", ".join(f"{k}: {np.mean(counts == k):.0%}" for k in used)
        text = (f"**Layer {layer}** (`{info.name}`), {info.num_experts} routed + {info.num_special} null experts to "
                f"choose from. Mean **{mean:.2f} experts per frame** over the {counts.size} frames (null experts "
                f"included; shared experts, always on, not counted). Share of frames by experts used: {shares}.")
        text += "\n\n" + self._references_note(reference_seconds)
        text += f"\n\nComputed in {result.seconds:.2f} s on {self.pipe.device.type.upper()}."
        return picture, chart, "\n\n".join([*(f"*{note}*" for note in notes), text])

    def usable_reference_prompts(self) -> dict[str, list[str]]:
        """The reference prompts this model can read (all of them for the bundled model), by domain."""
        model, most = self.pipe.model, self.pipe.model.config.max_text_tokens
        usable = {domain: [p for p in prompts if not model.unknown_words(p) and len(caption_words(p)) <= most]
                  for domain, prompts in self.reference_prompts.items()}
        return {domain: prompts for domain, prompts in usable.items() if prompts}

    def reference_means(self) -> tuple[dict[str, np.ndarray], float]:
        """``({"<domain> prompts": mean experts per token of every layer}, seconds spent now)``: the means over
        every frame of the usable reference prompts, computed at the first call (0 s spent afterwards) and kept
        for the app's life. Under the run lock: the pipeline runs one call at a time."""
        with self._lock:
            if self._references is not None:
                return self._references, 0.0
            start = time.perf_counter()
            self._references = {f"{domain} prompts": self._mean_experts(prompts)
                                for domain, prompts in self.usable_reference_prompts().items()}
            return self._references, time.perf_counter() - start

    def _mean_experts(self, prompts: Sequence[str]) -> np.ndarray:
        generators = [torch.Generator().manual_seed(self.reference_seed + i) for i in range(len(prompts))]
        out = self.pipe(list(prompts), guidance_scale=self.tab.guidance, temperature=self.default_temperature,
                        top_k=self.default_top_k, generator=generators, return_routing=True)
        return np.array([counts.mean() for counts in out.experts_per_token])

    def _references_note(self, seconds: float) -> str:
        usable = self.usable_reference_prompts()
        if not usable:
            return "No reference bars: this model's vocabulary covers none of the reference prompts."
        listed = "; ".join(f"{domain}: " + ", ".join(f"\u201c{p}\u201d" for p in prompts)
                           for domain, prompts in usable.items())
        when = f" (at this run, in {seconds:.2f} s)" if seconds else ""
        return (f"Reference bars: the mean over every frame of fixed prompts ({listed}), seeds from "
                f"{self.reference_seed} up, one per prompt in order, guidance {self.tab.guidance:g}, temperature "
                f"{self.default_temperature:g}, top-k {self.default_top_k}; computed once for this app{when}.")


class SceneQA(TabApp):
    """Questions about a picture with the multimodal LM: pick a generated scene (by number: test scenes, never
    trained on) or upload a picture, ask, read the answer. Beside it, for the chosen routed layer, the picture
    with the expert each image token went to, the question's words coloured by their experts, and which share of
    each modality's tokens went to which expert group (intra-modality vs shared)."""

    pipeline_class = VisualQAPipeline
    button_label = "Ask"
    picture_label = "Which expert each image token went to"
    chart_label = "Expert load per modality"
    max_scene: ClassVar[int] = 9999

    def input_components(self):
        example = self.tab.examples[0] if self.tab.examples else (0, "what shape is the red object?")
        return [gr.Number(value=example[0], precision=0, minimum=0, maximum=self.max_scene,
                          label="Generated scene (number)", info="a test scene the model never trained on"),
                image_input(label="Or upload a picture", height=160),
                gr.Textbox(value=example[1], label="Question", max_lines=2,
                           info="e.g. what colour is the leftmost object? / how many circles are there? / "
                                "describe the picture.")]

    def output_component(self):
        return gr.Textbox(label="Answer", interactive=False, lines=2)

    def examples(self, folder):
        return [[scene, None, question, self.default_layer] for scene, question in self.tab.examples]

    def visible_example_columns(self):
        return [0, 2]

    def run(self, scene, upload, question, layer=None, progress=gr.Progress(track_tqdm=True)):
        return self._run((scene, upload, question), layer)

    def prepare(self, scene, upload, question):
        question = checked_prompt(question, "what shape is the red object?", ask="ask a question about the picture")
        notes = []
        if upload:
            image = open_upload(upload, "Picture")
            notes.append(f"Your picture ({image.width}x{image.height}) is read at the model's "
                         f"{self.pipe.model.image_size[1]}x{self.pipe.model.image_size[0]} pixels.")
            return (image, question), notes
        if not _is_whole_in(scene, 0, self.max_scene):
            raise gr.Error(f"Scene must be a whole number from 0 to {self.max_scene}, got {scene!r}.")
        return (generated_scene(int(scene), self.pipe.model.image_size[0]), question), notes

    def compute(self, image, question):
        out = self.pipe(images=image, prompt=question, return_routing=True)
        layers = [i for i, block in enumerate(self.pipe.model.blocks) if out.routing[i][0] is not None]
        maps = [out.image_experts(i) for i in layers] if out.image_grid else []
        vocab = self.pipe.model.vocab
        names = [*vocab.words, "<unk>", *vocab.specials]
        ids = vocab.encode(question)
        text_rows = np.flatnonzero(out.modality[0] == 0)  # <bos>, the prompt, <sep>, then the answer as fed back
        fed = ([names[i] for i in ids] + ["<sep>"] + [names[i] for i in out.token_ids[0]])
        base = {"tokens": list(zip(fed, text_rows[1:])), "routing": [out.routing[i][0] for i in layers],
                "shares": [out.modality_shares(i) for i in layers], "image": image}
        return Result(out.text[0], maps, base)

    def routing_panel(self, result: Result, layer: int | None, notes: Sequence[str] = ()) -> tuple:
        """(the picture with each image token's expert, load per modality chart, the words coloured by expert and
        the expert-group shares per modality)."""
        if layer is None or not result.maps:
            return super().routing_panel(result, layer, notes)
        self._check_maps(result)
        info, map_, base = self.layers[layer], result.maps[layer], result.base
        labels = list(info.labels) or expert_labels(info.num_experts, info.num_special)
        picture = routing_map_picture(map_, info.num_experts, base["image"], labels, info.num_special,
                                      title=f"Layer {layer}: the first-choice expert of each of the {map_.size} image tokens")
        shares = base["shares"][layer]
        groups = sorted({g for per in shares.values() for g in per})
        chart = modality_share_chart(shares, groups, title=f"Layer {layer}: share of each modality's routed slots")
        colours = expert_colors(info.num_experts + info.num_special, info.num_experts)
        experts = base["routing"][layer]
        words = []
        for word, row in base["tokens"]:  # text rows: <bos>, the prompt's words, <sep>, the answer's fed words
            first = int(experts[row, 0])
            if first < 0:
                continue
            r, g, b = (int(c) for c in colours[first])
            words.append(f'<span style="background: rgb({r},{g},{b}); padding: 0 3px; border-radius: 3px" '
                         f'title="{labels[first]}">{html.escape(word)}</span>')
        share_text = "; ".join(f"{m}: " + ", ".join(f"{g} {v:.0%}" for g, v in per.items()) for m, per in shares.items())
        text = (f"**Layer {layer}** (`{info.name}`). The question's words by first-choice expert: {' '.join(words)}"
                f"\n\nShare of routed slots per expert group, by modality: {share_text}."
                f"\n\nAnswered in {result.seconds:.2f} s on {self.pipe.device.type.upper()}.")
        return picture, chart, "\n\n".join([*(f"*{note}*" for note in notes), text])


def generated_scene(number: int, size: int) -> Image.Image:
    """Scene ``number`` of the ``"test"`` split (the split no model trains on), as a PIL image."""
    from moezoo.training.datasets.scenes import render_scene, sample_scene, scene_rng

    return Image.fromarray(render_scene(sample_scene(scene_rng("test", 0, number), "test"), size))


def image_input(**options) -> gr.Image:
    """An image upload whose decoding failures are readable errors. Gradio opens an upload with PIL before our
    function runs, so a file that is not an image would otherwise fail with a bare "Error". The instance's
    ``preprocess`` is wrapped rather than subclassed: gradio writes a ``.pyi`` stub beside the source file of
    every component subclass."""
    component = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], **options)
    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except gr.Error:
            raise
        except Exception as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            if isinstance(err, Image.DecompressionBombError):  # gradio's Image.open: over PIL's limit, far above ours
                path = getattr(payload, "path", None)  # None for an image sent inline as a data: URL
                raise too_many_pixels(component.label, name, header_size(path) if path else None) from err
            raise gr.Error(f"{component.label}: {name} is not an image this demo can read ({type(err).__name__}); "
                           f"accepted: {ACCEPTED_IMAGES}.") from err

    component.preprocess = preprocess
    return component


# ----------------------------------------------------------------------------------------------------------
# Examples made from the bundled photographs (held-out ones: the models never trained on them)
# ----------------------------------------------------------------------------------------------------------


def weather_examples(folder: Path) -> list[str]:
    """Held-out photos with synthetic rain streaks, snow and haze, saved as PNGs."""
    from moezoo.training.datasets.photos import load_photo
    from moezoo.training.datasets.weather import add_weather

    paths = []
    for i, (photo, weather) in enumerate([("coffee", "rain_streaks"), ("chelsea", "snow"), ("camera", "haze")]):
        degraded = add_weather(load_photo(photo), weather, np.random.default_rng([7, i]))
        path = folder / f"{photo}_{weather}.png"
        Image.fromarray(np.round(degraded * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def fusion_examples(folder: Path) -> list[tuple[str, str]]:
    """Synthetic infrared/visible pairs from held-out photos, one in low light and one in fog."""
    from moezoo.training.datasets.fusion_pairs import synthesize_pair

    pairs = []
    for i, (photo, degradation) in enumerate([("chelsea", "low_light"), ("coffee", "fog")]):
        pair = synthesize_pair(photo, np.random.default_rng([7, i]), 256, degradation)
        paths = []
        for key in ("ir", "vis"):
            path = folder / f"{photo}_{degradation}_{key}.png"
            Image.fromarray(np.round(pair[key] * 255).astype(np.uint8), mode="L").save(path)
            paths.append(str(path))
        pairs.append((paths[0], paths[1]))
    return pairs


# ----------------------------------------------------------------------------------------------------------
# The list of tabs
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tab:
    """One entry of the demo.

    Attributes:
        title: the tab's label.
        model: the zoo model whose bundled weights it serves.
        kind: the :class:`TabApp` subclass that builds its UI and runs it.
        api_name: the listener's API name (``/api_name``); also names its other endpoints.
        description: markdown shown above the controls.
        examples: for generation, rows ``(class id or prompt, seed)``; for restoration / fusion, a function
            that writes example images into a folder and returns their paths.
        steps, guidance: the defaults of the sampling controls (generation kinds).
        fps: frames per second of exported videos.
        max_side: uploads with a longer side are scaled down to it (restoration / fusion).
        default_layer: the MoE layer shown first (None: the middle one).
        unit: what one routing decision covers, for the captions ("patches", "gate cells").
    """

    title: str
    model: str
    kind: type[TabApp]
    api_name: str
    description: str = ""
    examples: Any = ()
    steps: int = 20
    guidance: float = 2.0
    fps: int = 8
    max_side: int = 1024
    default_layer: int | None = None
    unit: str = "patches"


def pipeline_defaults(model: str) -> dict:
    """A diffusion tab's ``steps`` and ``guidance``: what the pipeline uses for ``model`` when given none (the
    sampling its metadata recommends, measured: README "Measured"), read without loading its weights."""
    sampling = recommended_sampling(get_pretrained_cfg(model).metadata)
    return dict(steps=sampling["num_inference_steps"], guidance=sampling["guidance_scale"])


TABS: list[Tab] = [
    Tab("Digits: class → image", "dit_moe_digits", ClassToImage, "digits",
        "A class-conditional **DiT-MoE** (8 experts, top-2, plus shared experts) draws a 16×16 digit in pixel "
        "space. Pick a digit.",
        examples=[(3, 0), (7, 1), (0, 2), (8, 3)], **pipeline_defaults("dit_moe_digits")),
    Tab("Shapes: text → image", "dit_moe_shapes", TextToImage, "shapes",
        "A text-conditioned **DiT-MoE** with its own tiny CLIP text tower draws 32×32 shapes: "
        "*a [small|large] [red|green|blue|yellow] [circle|square|triangle] [on the left|on the right|at the top|"
        "at the bottom|in the center]*.",
        examples=[("a large red circle on the left", 0), ("a small blue square at the top", 1),
                  ("a large yellow triangle in the center", 2), ("a small green circle on the right", 3)],
        **pipeline_defaults("dit_moe_shapes")),
    Tab("Moving shapes: text → video", "dit_moe_shapes_video", TextToVideo, "shapes_video",
        "A spatio-temporal **DiT-MoE** makes an 8-frame clip: *a [red|green|blue|yellow] [circle|square|triangle] "
        "moving [left|right|up|down]*. The routing map has one panel per frame.",
        examples=[("a red square moving left", 0), ("a blue circle moving up", 1), ("a yellow triangle moving right", 2)],
        **pipeline_defaults("dit_moe_shapes_video")),
    Tab("Deweather: restoration", "mofme_weather", Restore, "deweather",
        "**MoFME** removes rain streaks, raindrops, snow and haze; its experts are feature-wise modulations of one "
        "shared FFN. The photo is restored in 256 px tiles; compare before and after with the slider.",
        examples=weather_examples, max_side=1024),
    Tab("IR + visible fusion", "moe_fusion_irvis", Fuse, "fusion",
        "**MoE-Fusion** fuses a registered infrared/visible pair. In the local layers half the experts rebuild a "
        "region from the visible image and half from infrared: the map shows which modality won where.",
        examples=fusion_examples, max_side=640, unit="gate cells"),
    Tab("Speech & music: text → audio", "unimoe_audio_tiny", TextToAudio, "audio",
        "**UniMoE-Audio** says a word or plays a note or chord (about 1 s): *the word [zero … nine|yes|no|up|down|"
        "left|right|on|off|stop|go]*, *a [sine|square|sawtooth|plucked] [C3 … B4] note*, *a [C|D|E|F|G|A] "
        "[major|minor] chord on a [sine wave|square wave|sawtooth wave|plucked string]*. Its dynamic-capacity MoE "
        "lets each audio frame take as many experts as it needs (top-p over routed and null experts): under the "
        "spectrogram, how many each frame used.",
        examples=[("the word seven", 0), ("a plucked C4 note", 1), ("a C major chord on a square wave", 2),
                  ("the word yes", 3)],
        guidance=AudioPipeline.DEFAULT_GUIDANCE, unit="audio frames"),
    Tab("Scenes: picture → answer", "moe_vlm_tiny", SceneQA, "scene_qa",
        "A small **multimodal MoE language model** answers questions about a scene: *what shape is the [colour] "
        "object?*, *what colour is the [leftmost|rightmost|topmost|bottommost] object?*, *how many "
        "[circles|squares|triangles|objects] are there?*, *what shape is the object [closest to|furthest from] the "
        "[colour] object?*, *is the [colour] object left of the [colour] object?*, *is there a [colour] [shape]?*, "
        "or *describe the picture.* Beside the answer: the expert each image token went to in the chosen layer, "
        "the question's words coloured by their experts, and how each modality's tokens split between its own "
        "experts and the shared ones.",
        examples=[(0, "what shape is the red object?"), (1, "how many circles are there?"),
                  (2, "describe the picture."), (3, "what colour is the leftmost object?")],
        unit="tokens"),
]


# ----------------------------------------------------------------------------------------------------------
# Building and launching
# ----------------------------------------------------------------------------------------------------------

_SESSION_FOLDER: str | None = None


def _session_folder() -> str:
    """A temporary folder for this process's videos, example files and example cache, removed when the process
    ends: at a normal exit, after Ctrl-C / SIGINT (its KeyboardInterrupt ends the app normally) and on SIGTERM."""
    global _SESSION_FOLDER
    if _SESSION_FOLDER is None:
        _SESSION_FOLDER = tempfile.mkdtemp(prefix="moezoo-demo-")
        atexit.register(_remove_session_folder)
        _remove_session_folder_on_sigterm()
    return _SESSION_FOLDER


def _remove_session_folder() -> None:
    if _SESSION_FOLDER is not None:
        shutil.rmtree(_SESSION_FOLDER, ignore_errors=True)


def _remove_session_folder_on_sigterm() -> None:
    """SIGTERM's default action ends the process without running atexit. Where SIGTERM still has that default,
    remove the folder first, then end the process as SIGTERM would have (a parent sees "killed by SIGTERM").
    A program with its own SIGTERM handler keeps it (and atexit cleans up if it exits); handlers can only be set
    from the main thread, so a demo built in another thread relies on atexit alone."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return

    def remove_and_terminate(signum, frame):
        _remove_session_folder()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, remove_and_terminate)


def load_bundled(tab: Tab):
    """The default loader: the tab's pipeline from the bundled weights, never from the network."""
    return tab.kind.pipeline_class.from_pretrained(tab.model, local_files_only=True)


@contextlib.contextmanager
def _examples_cache(folder: Path) -> Iterator[None]:
    """Gradio keys its example cache by component id only, so a cache from an earlier run (other weights, other
    tabs) would be served as if current. Each build caches into its own folder instead."""
    previous = os.environ.get("GRADIO_EXAMPLES_CACHE")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("GRADIO_EXAMPLES_CACHE", None)
        else:
            os.environ["GRADIO_EXAMPLES_CACHE"] = previous


def build_demo(
    tabs: Sequence[Tab] = TABS,
    load_pipeline: Callable[[Tab], Any] = load_bundled,
    cache_examples: bool = True,
) -> gr.Blocks:
    """The demo as a ``gr.Blocks``: one tab per entry of ``tabs``.

    Args:
        tabs: the tabs, in order (default :data:`TABS`).
        load_pipeline: ``tab -> pipeline``; the default loads bundled weights. A tab whose pipeline fails to
            load shows the reason instead of its controls.
        cache_examples: cache example outputs lazily (computed at their first click, then served).

    The built demo carries its tab apps as ``demo.tab_apps`` (api_name -> :class:`TabApp`, loaded tabs only).
    """
    names = [tab.api_name for tab in tabs]
    if len(set(names)) != len(names):
        raise ValueError(f"tab api_names must be unique, got {names}")
    session = Path(_session_folder())
    pipes = {tab.api_name: _load(tab, load_pipeline) for tab in tabs}
    # Open on the first tab that works: a newcomer should not land on "not available".
    first = next((tab.api_name for tab in tabs if not isinstance(pipes[tab.api_name], Exception)), None)
    apps: dict[str, TabApp] = {}
    with _examples_cache(session / f"examples-{time.time_ns()}"), gr.Blocks(
        title="moezoo: mixture-of-experts demo", analytics_enabled=False
    ) as demo:
        gr.Markdown("# moezoo · mixtures of experts, made visible\n"
                    "Every model here routes each patch to a few of its experts. Beside each output: **which "
                    "expert each patch went to** in the chosen layer, and **how the load spread over the "
                    "experts**. Everything runs on CPU from the bundled weights.")
        with gr.Tabs(selected=first):
            for tab in tabs:
                with gr.Tab(tab.title, id=tab.api_name):
                    if tab.description:
                        gr.Markdown(tab.description)
                    pipe = pipes[tab.api_name]
                    if isinstance(pipe, Exception):
                        _unavailable(tab, pipe)
                    else:
                        apps[tab.api_name] = _build_tab(tab, pipe, session, cache_examples)
    demo.queue(max_size=32)
    demo.tab_apps = apps
    return demo


def _load(tab: Tab, load_pipeline):
    """The tab's pipeline, or the exception that stopped it: missing, corrupt or unregistered weights must not
    take the other tabs down."""
    try:
        return load_pipeline(tab)
    except Exception as err:
        _logger.warning("tab %r unavailable: %s", tab.title, err)
        return err


def _unavailable(tab: Tab, err: Exception) -> None:
    quoted = "\n".join(f"> {line}" for line in f"{type(err).__name__}: {err}".splitlines())
    gr.Markdown(f"**This tab is not available:** the weights of `{tab.model}` could not be loaded.\n\n{quoted}\n\n"
                "Bundle them (see the README's training section) and restart the demo.")


def _build_tab(tab: Tab, pipe, session: Path, cache_examples: bool) -> TabApp:
    app = tab.kind(tab, pipe)
    api = tab.api_name
    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=260):
            inputs = app.input_components()
            for i, component in enumerate(inputs):
                component.elem_id = f"{api}-input-{i}"  # stable handles for browser tests and custom CSS
            layer = app.layer_dropdown()
            layer.elem_id = f"{api}-layer"
            button = gr.Button(app.button_label, variant="primary", elem_id=f"{api}-run")
        with gr.Column(scale=5, min_width=280):
            output = app.output_component()
            output.elem_id = f"{api}-output"
        with gr.Column(scale=5, min_width=280):
            # The pictures carry their own titles: gradio's label badge would cover them.
            picture = gr.Image(label=app.picture_label, show_label=False, type="pil", format="png",
                               interactive=False, height=320, buttons=["fullscreen"], elem_id=f"{api}-map")
            chart = gr.Image(label=app.chart_label, show_label=False, type="pil", format="png", interactive=False,
                             height=220, buttons=[], elem_id=f"{api}-chart")
            notes = gr.Markdown(elem_id=f"{api}-notes")
    outputs = [output, picture, chart, notes]
    triggers = [button.click] + [c.submit for c in inputs if isinstance(c, gr.Textbox)]
    listen = dict(fn=app.run, inputs=[*inputs, layer], outputs=outputs, concurrency_limit=1,
                  concurrency_id=tab.model)
    gr.on(triggers, api_name=api, **listen)
    # Another layer: the same call, served from the memo when the inputs did not change.
    layer.input(api_name=f"{api}_layer", api_visibility="undocumented", show_progress="minimal", **listen)
    folder = session / f"{api}-examples"
    folder.mkdir(parents=True, exist_ok=True)
    rows = app.examples(folder)
    if rows:
        gr.Examples(rows, inputs=[*inputs, layer], outputs=outputs, fn=app.run, cache_examples=cache_examples,
                    cache_mode="lazy", visible_columns=app.visible_example_columns(),
                    api_name=f"{api}_example", label="Examples (click one)")
    return app


# Local fonts only: the default theme would fetch its fonts from Google, and the demo must work offline.
THEME = gr.themes.Soft(primary_hue="indigo", font=["system-ui", "sans-serif"], font_mono=["monospace"])


def launch_demo(demo: gr.Blocks | None = None, **options):
    """Serve the demo on 127.0.0.1 (port 7860 or the next free one) with analytics off; ``options`` go to
    ``gr.Blocks.launch`` (e.g. ``server_port``, ``prevent_thread_lock=True``)."""
    demo = build_demo() if demo is None else demo
    defaults = dict(server_name="127.0.0.1", theme=THEME, max_file_size=f"{MAX_UPLOAD_MB}mb", show_error=True)
    return demo.launch(**{**defaults, **options})
