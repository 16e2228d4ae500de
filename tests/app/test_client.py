"""The demo served for real and scripted with gradio_client: the named endpoints exist, a run returns its files
(the audio tab's wav too), bad input comes back as a readable error, and the app keeps serving afterwards."""

import numpy as np
import pytest
import soundfile
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from moezoo.app.demo import TABS, build_demo, launch_demo

# gradio's queue calls pandas in ways pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")

STEPS, GUIDANCE = 2, 2.0


@pytest.fixture(scope="module")
def served(tiny_loader, tmp_path_factory):
    demo = build_demo(load_pipeline=tiny_loader, cache_examples=False)
    _, url, _ = launch_demo(demo, server_port=None, prevent_thread_lock=True, quiet=True)
    client = Client(url, verbose=False, analytics_enabled=False,
                    download_files=str(tmp_path_factory.mktemp("downloads")))
    try:
        yield url, client
    finally:
        client.close()
        demo.close()


def test_every_tab_is_a_named_endpoint(served):
    url, client = served
    assert url.startswith("http://127.0.0.1:")
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for tab in TABS:
        assert f"/{tab.api_name}" in endpoints


def test_generate_returns_the_image_and_routing_pictures(served):
    _, client = served
    image, picture, chart, notes = client.predict("4", 3, STEPS, GUIDANCE, 1, api_name="/digits")
    assert Image.open(image).size == (256, 256)
    assert Image.open(picture).width >= 256 and Image.open(chart).size == (420, 260)
    assert "Layer 1" in notes and "64 patches" in notes


def test_bad_input_is_a_readable_error_and_the_app_keeps_serving(served, tmp_path):
    _, client = served
    with pytest.raises(AppError, match="The prompt is empty"):
        client.predict("  ", 0, STEPS, GUIDANCE, 0, api_name="/shapes")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(AppError, match="notes.png is not an image this demo can read"):
        client.predict(handle_file(str(not_an_image)), 0, api_name="/deweather")
    ir, vis = tmp_path / "ir.png", tmp_path / "vis.png"
    Image.new("L", (32, 32)).save(ir)
    Image.new("L", (32, 24)).save(vis)
    with pytest.raises(AppError, match="infrared image is 32x32 but the visible image is 32x24"):
        client.predict(handle_file(str(ir)), handle_file(str(vis)), 0, api_name="/fusion")
    # still serving: a good request after the bad ones
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(photo)
    pair, picture, chart, notes = client.predict(handle_file(str(photo)), 0, api_name="/deweather")
    assert [Image.open(p["path"] if isinstance(p, dict) else p).size for p in pair] == [(24, 16), (24, 16)]
    assert "Layer 0" in notes


def test_layer_as_the_string_the_schema_advertises(served):
    _, client = served
    layer = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/digits"]["parameters"][-1]
    assert layer["type"]["type"] == "string"
    by_text = client.predict("4", 3, STEPS, GUIDANCE, "1", api_name="/digits")
    by_number = client.predict("4", 3, STEPS, GUIDANCE, 1, api_name="/digits")
    assert "**Layer 1**" in by_text[3]
    assert np.array_equal(np.asarray(Image.open(by_text[1])), np.asarray(Image.open(by_number[1])))
    for bad in ("2", "top"):
        with pytest.raises(AppError, match=f"MoE layer must be a whole number from 0 to 1, got '{bad}'"):
            client.predict("4", 3, STEPS, GUIDANCE, bad, api_name="/digits")


def test_an_enormous_upload_gets_the_pixel_limit(served, huge_png):
    _, client = served
    with pytest.raises(AppError, match=r"\(huge.png\) is 20000x20000 = 400 megapixels; this demo accepts up to 40 "
                                       r"megapixels\.") as caught:
        client.predict(handle_file(str(huge_png)), 0, api_name="/deweather")
    assert "DecompressionBomb" not in str(caught.value)


def test_audio_endpoint_returns_a_wav_and_its_pictures(served, tiny_pipelines):
    _, client = served
    path, picture, chart, notes = client.predict("the word seven", 3, 3.0, 1.0, 8, "1", api_name="/audio")
    reference = tiny_pipelines["unimoe_audio_tiny"]("the word seven", guidance_scale=3.0, temperature=1.0, top_k=8,
                                                    generator=torch.Generator().manual_seed(3))
    samples, rate = soundfile.read(path, dtype="float32")
    assert rate == reference.sampling_rate and samples.shape == reference.audios[0].shape
    assert Image.open(picture).width >= 520 and Image.open(chart).size == (420, 260)
    assert "**Layer 1**" in notes and "experts per frame" in notes
    with pytest.raises(AppError, match="Unknown word 'banana': this model knows only"):
        client.predict("the word banana", 3, 3.0, 1.0, 8, "1", api_name="/audio")
