"""zoo.hub against a real HTTP server on 127.0.0.1: downloads are verified, cached once, atomic, and offline
mode uses the cache only. Also the pretrained-cfg source order and the checkpoint readers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import files_under
from safetensors.torch import save_file

from moezoo.zoo import hub
from moezoo.zoo.registry import PretrainedCfg

GOOD = safetensors.torch.save({"w": torch.arange(3000, dtype=torch.float32)})  # a real file: unpinned
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()  # downloads must parse as safetensors
OTHER_SHA = hashlib.sha256(b"something else").hexdigest()

pytestmark = pytest.mark.usefixtures("online")  # tests/zoo/conftest.py: online, default cache in tmp_path


@pytest.fixture
def server(weights_server):
    """/good.safetensors and /wrong.safetensors serve GOOD, /truncated.safetensors announces GOOD's length but
    sends 100 bytes and closes; anything else is a 404 (see conftest.py)."""
    Reply = weights_server.Reply
    weights_server.serve("/good.safetensors", Reply(GOOD))
    weights_server.serve("/wrong.safetensors", Reply(GOOD))
    weights_server.serve("/truncated.safetensors", Reply(GOOD[:100], length=len(GOOD)))
    return weights_server


def test_download_verifies_caches_and_hits_without_a_request(server, cache):
    url = f"{server.url}/good.safetensors"
    path = hub.download_url(url, sha256=GOOD_SHA, cache_dir=cache, progress=False)
    assert path.read_bytes() == GOOD and path.name == "good.safetensors"
    repo = hub.url_cache_dir(url, cache)
    assert repo.name.startswith("models--moezoo--url-") and path == repo / "snapshots" / GOOD_SHA / "good.safetensors"
    assert (repo / "blobs" / GOOD_SHA).read_bytes() == GOOD
    assert not [p for p in files_under(cache) if p.name.endswith(".incomplete")]
    assert hub.download_url(url, sha256=GOOD_SHA, cache_dir=cache, progress=False) == path
    assert server.paths_requested() == ["/good.safetensors"]


def test_unpinned_download_is_cached_under_its_hash(server, cache):
    url = f"{server.url}/good.safetensors"
    path = hub.download_url(url, cache_dir=cache, progress=False)
    assert (hub.url_cache_dir(url, cache) / "refs" / "main").read_text() == GOOD_SHA
    assert hub.download_url(url, cache_dir=cache, progress=False) == path
    assert len(server.paths_requested()) == 1


def test_default_cache_follows_hf_hub_cache(server, tmp_path):
    path = hub.download_url(f"{server.url}/good.safetensors", sha256=GOOD_SHA, progress=False)
    assert path.is_relative_to(tmp_path / "default-cache")


def test_wrong_hash_names_both_hashes_and_leaves_the_cache_clean(server, cache):
    before = files_under(cache)
    url = f"{server.url}/wrong.safetensors"
    with pytest.raises(hub.ChecksumError) as info:
        hub.download_url(url, sha256=OTHER_SHA, cache_dir=cache, progress=False)
    message = str(info.value)
    assert OTHER_SHA in message and GOOD_SHA in message and url in message
    assert files_under(cache) == before


@pytest.mark.parametrize("path, message", [("/truncated.safetensors", "truncated|interrupted"),
                                           ("/missing.safetensors", "404")], ids=["truncated-body", "http-404"])
def test_failed_download_names_the_url_and_leaves_the_cache_clean(server, cache, path, message):
    url = server.url + path
    with pytest.raises(hub.DownloadError, match=message) as info:
        hub.download_url(url, sha256=GOOD_SHA, cache_dir=cache, progress=False)
    assert url in str(info.value)
    assert files_under(cache) == set()


def test_interrupted_download_leaves_the_cache_clean(server, cache, monkeypatch):
    class Interrupting(hub.tqdm):
        def update(self, n=1):
            raise KeyboardInterrupt

    monkeypatch.setattr(hub, "tqdm", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        hub.download_url(f"{server.url}/good.safetensors", sha256=GOOD_SHA, cache_dir=cache, progress=False)
    assert files_under(cache) == set()


def test_offline_returns_the_cached_file_after_the_server_is_gone(server, cache, monkeypatch):
    url = f"{server.url}/good.safetensors"
    path = hub.download_url(url, sha256=GOOD_SHA, cache_dir=cache, progress=False)
    server.shutdown()
    server.server_close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_url(url, sha256=GOOD_SHA, cache_dir=cache) == path
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub.download_url(url, sha256=GOOD_SHA, cache_dir=cache, local_files_only=True) == path


@pytest.mark.parametrize("how", ["env", "local_files_only"])
def test_offline_with_nothing_cached_is_a_clear_error_without_a_request(server, cache, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = f"{server.url}/good.safetensors"
    with pytest.raises(hub.NotCachedError, match="offline mode") as info:
        hub.download_url(url, sha256=GOOD_SHA, cache_dir=cache, local_files_only=how == "local_files_only")
    assert url in str(info.value) and "not in the cache" in str(info.value)
    assert server.requests == []


def test_corrupted_cache_entry_is_downloaded_again(server, cache):
    url = f"{server.url}/good.safetensors"
    hub.download_url(url, sha256=GOOD_SHA, cache_dir=cache, progress=False)
    (hub.url_cache_dir(url, cache) / "blobs" / GOOD_SHA).write_bytes(b"bit rot")
    path = hub.download_url(url, sha256=GOOD_SHA, cache_dir=cache, progress=False)
    assert path.read_bytes() == GOOD and len(server.paths_requested()) == 2


def test_progress_bars_can_be_turned_off(monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert not hub.progress_enabled(False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    assert not hub.progress_enabled(True)


# ----------------------------------------------------------------------------------------------------------
# Source order of a pretrained cfg
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def bundled(tmp_path, monkeypatch) -> Path:
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setattr(hub, "WEIGHTS_DIR", weights)
    return weights


def test_bundled_file_comes_first(server, bundled, cache):
    (bundled / "w.safetensors").write_bytes(GOOD)
    cfg = PretrainedCfg(file="w.safetensors", url=f"{server.url}/good.safetensors", sha256=GOOD_SHA)
    assert hub.resolve_pretrained(cfg, "m.t", cache_dir=cache) == bundled / "w.safetensors"
    assert server.requests == []


def test_missing_bundled_file_falls_back_to_the_url(server, bundled, cache):
    cfg = PretrainedCfg(file="w.safetensors", url=f"{server.url}/good.safetensors", sha256=GOOD_SHA)
    assert hub.resolve_pretrained(cfg, "m.t", cache_dir=cache, progress=False).read_bytes() == GOOD


def test_every_failed_source_is_named(server, bundled, cache, hang_up_hub):
    (bundled / "w.safetensors").write_bytes(b"tampered")
    cfg = PretrainedCfg(
        file="w.safetensors", url=f"{server.url}/missing.safetensors", sha256=GOOD_SHA, hf_hub_id="org/repo"
    )
    with pytest.raises(hub.WeightsNotFoundError) as info:
        hub.resolve_pretrained(cfg, "m.t", cache_dir=cache, progress=False)
    message = str(info.value)
    assert "m.t" in message
    assert "bundled file" in message and "sha256 mismatch" in message and GOOD_SHA in message
    assert f"{server.url}/missing.safetensors" in message and "404" in message
    assert "org/repo" in message and "could not reach the Hugging Face Hub" in message
    assert len(hang_up_hub.requests_for("/org/repo/")) == 1  # one HEAD, no retries


def test_hub_source_is_tagged_as_moezoo(bundled, cache, monkeypatch, tmp_path):
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append(kwargs)
        return str(tmp_path / filename)

    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = PretrainedCfg(hf_hub_id="org/repo", revision="v1")
    assert hub.resolve_pretrained(cfg, "m.t", cache_dir=cache) == tmp_path / "model.safetensors"
    (kwargs,) = calls
    assert kwargs["library_name"] == "moezoo" and kwargs["revision"] == "v1"
    assert kwargs["local_files_only"] is True and kwargs["cache_dir"] == cache


# ----------------------------------------------------------------------------------------------------------
# Reading checkpoints, saving models
# ----------------------------------------------------------------------------------------------------------


def test_load_checkpoint_unwraps_training_containers(tmp_path, caplog):
    weights, ema = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    torch.save({"model": weights, "ema": ema, "epoch": 3}, tmp_path / "train.pt")
    assert torch.equal(hub.load_checkpoint(tmp_path / "train.pt")["w"], weights["w"])
    assert "checkpoint_key='ema'" in caplog.text
    assert torch.equal(hub.load_checkpoint(tmp_path / "train.pt", checkpoint_key="ema")["w"], ema["w"])
    torch.save({"state_dict": weights, "hyper_parameters": {"lr": 0.1}}, tmp_path / "lightning.ckpt")
    assert list(hub.load_checkpoint(tmp_path / "lightning.ckpt")) == ["w"]
    with pytest.raises(KeyError, match="'opt'"):
        hub.load_checkpoint(tmp_path / "train.pt", checkpoint_key="opt")


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "args": Path("x")}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match="weights_only"):
        hub.load_checkpoint(tmp_path / "objects.pt")


def test_save_pretrained_writes_both_files_atomically(tmp_path):
    model = torch.nn.Linear(3, 3)
    tied = torch.nn.Module()
    tied.a, tied.b = model, model  # shared storage, which safetensors refuses unless copied
    with pytest.raises(TypeError):
        hub.save_pretrained(tied, tmp_path / "bad", "linear", {"fn": print})
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    out = hub.save_pretrained(tied, tmp_path / "out", "linear", {"dim": 3}, metadata={"notes": "x"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = hub.load_safetensors(out / "model.safetensors")
    assert set(loaded) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    save_file(loaded, str(tmp_path / "again.safetensors"))  # loaded tensors are independent
