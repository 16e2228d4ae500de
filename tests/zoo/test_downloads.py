"""What can go wrong with a download, against local servers on 127.0.0.1 (tests/zoo/conftest.py): nothing
enters the cache unless it is complete and valid, a later call retries cleanly, file names from URLs cannot
lead out of the cache, killed downloads leave nothing that outlives the next download (and a live one is
never removed), and an unreachable or failing Hub is an error at once, without retries."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import files_under
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError

from moezoo.zoo import create_model, hub

GOOD = safetensors.torch.save({"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)})
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
HALF = GOOD[: len(GOOD) // 2]
WAIT_S = 30.0  # upper bound of every wait below; each normally takes milliseconds (the subprocess: ~3 s)

pytestmark = pytest.mark.usefixtures("online")  # tests/zoo/conftest.py: online, default cache in tmp_path


def _temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".incomplete")]


def _wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return found


# ----------------------------------------------------------------------------------------------------------
# Complete and valid, or nothing; and the next call retries
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pinned", [False, True], ids=["unpinned", "pinned"])
@pytest.mark.parametrize("length", [None, len(GOOD)], ids=["no-content-length", "content-length"])
def test_truncated_body_is_not_cached_and_the_next_call_downloads_again(weights_server, cache, pinned, length):
    """The issue's case: no pin and no Content-Length used to cache the half file for good."""
    Reply = weights_server.Reply
    url = weights_server.serve("/w.safetensors", Reply(HALF, length=length), Reply(GOOD))
    sha = GOOD_SHA if pinned else None
    expected = hub.ChecksumError if pinned and length is None else hub.DownloadError
    with pytest.raises(expected) as info:
        hub.download_url(url, sha256=sha, cache_dir=cache, progress=False)
    assert url in str(info.value)
    assert files_under(cache) == set()
    assert hub.download_url(url, sha256=sha, cache_dir=cache, progress=False).read_bytes() == GOOD


@pytest.mark.parametrize("body", [GOOD + b"\0" * 8, b"<html>502 Bad Gateway</html>", b"", GOOD[:7]],
                         ids=["padded", "html-page", "empty", "shorter-than-a-header"])
def test_unpinned_file_must_be_complete_safetensors(weights_server, cache, body):
    url = weights_server.serve("/w.safetensors", weights_server.Reply(body))
    with pytest.raises(hub.DownloadError, match="complete safetensors file") as info:
        hub.download_url(url, cache_dir=cache, progress=False)
    assert "pin the sha256" in str(info.value)
    assert files_under(cache) == set()


def test_a_pinned_file_need_not_be_safetensors(weights_server, cache):
    body = b"any bytes at all"
    url = weights_server.serve("/notes.txt", weights_server.Reply(body))
    path = hub.download_url(url, sha256=hashlib.sha256(body).hexdigest(), cache_dir=cache, progress=False)
    assert path.read_bytes() == body


def test_a_truncated_entry_cached_before_the_checks_is_replaced(weights_server, cache, caplog):
    """A cache poisoned by an older moezoo (half blob under its own hash, refs/main pointing at it)."""
    url = weights_server.serve("/w.safetensors", weights_server.Reply(GOOD))
    repo = hub.url_cache_dir(url, cache)
    half_sha = hashlib.sha256(HALF).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / half_sha).write_bytes(HALF)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(half_sha)
    assert hub.download_url(url, cache_dir=cache, progress=False).read_bytes() == GOOD
    assert not (repo / "blobs" / half_sha).exists() and (repo / "refs" / "main").read_text() == GOOD_SHA
    assert "removing invalid cache entry" in caplog.text


@pytest.mark.parametrize("where", ["mid-body", "before-headers"])
def test_a_stalled_server_is_an_error_after_the_timeout(weights_server, cache, monkeypatch, where):
    monkeypatch.setattr(hub, "DOWNLOAD_TIMEOUT_S", 0.3)
    Reply = weights_server.Reply
    stall = Reply(GOOD, stall_after=100) if where == "mid-body" else Reply(GOOD, stall_before_headers=True)
    url = weights_server.serve("/w.safetensors", stall)
    with pytest.raises(hub.DownloadError, match="interrupted after 100 of|timed out") as info:
        hub.download_url(url, sha256=GOOD_SHA, cache_dir=cache, progress=False)
    assert url in str(info.value)
    assert files_under(cache) == set()


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors_name_the_url_and_are_not_retried(weights_server, cache, status):
    url = weights_server.serve("/w.safetensors", weights_server.Reply(b"error page", status=status))
    with pytest.raises(hub.DownloadError, match=str(status)) as info:
        hub.download_url(url, cache_dir=cache, progress=False)
    assert url in str(info.value)
    assert weights_server.paths_requested() == ["/w.safetensors"]
    assert files_under(cache) == set()


def test_only_http_urls_are_downloaded(cache, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(GOOD)
    with pytest.raises(ValueError, match="http"):
        hub.download_url((tmp_path / "w.safetensors").as_uri(), cache_dir=cache)


# ----------------------------------------------------------------------------------------------------------
# File names from URLs and paths inside the cache
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url_name", "cached_name"), [
    ("..%2F..%2F..%2F..%2Fescape.safetensors", "escape.safetensors"),  # the probe, relative
    ("%2F..%2F..%2F..%2Ftmp%2Fescape.safetensors", "escape.safetensors"),  # ... and absolute
    ("..%5C..%5C..%5C..%5Cescape.safetensors", "escape.safetensors"),  # Windows separators
    ("C%3A%5Cescape.safetensors", "escape.safetensors"),  # a drive
    ("%2e%2E", hub.WEIGHTS_NAME),  # nothing but a parent reference
    ("%252F..%252Fescape.safetensors", "%2F..%2Fescape.safetensors"),  # decoded once: a plain name
])
def test_url_file_names_cannot_lead_out_of_the_cache(weights_server, tmp_path, cache, url_name, cached_name):
    outside_before = {p for p in tmp_path.rglob("*") if cache not in p.parents}
    url = weights_server.serve(f"/dir/{url_name}", weights_server.Reply(GOOD))
    path = hub.download_url(url, cache_dir=cache, progress=False)
    assert path.name == cached_name and path.read_bytes() == GOOD
    assert path.resolve().is_relative_to(cache.resolve()) and path.parent.parent.parent.parent == cache
    assert {p for p in tmp_path.rglob("*") if cache not in p.parents} == outside_before


def test_control_characters_in_a_url_file_name_are_refused(cache):
    with pytest.raises(ValueError, match="control characters"):
        hub.download_url("http://127.0.0.1:9/x%00.safetensors", cache_dir=cache)


def test_a_symlink_planted_in_the_cache_is_not_followed_out(weights_server, tmp_path, cache):
    url = weights_server.serve("/w.safetensors", weights_server.Reply(GOOD))
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = hub.url_cache_dir(url, cache)
    repo.mkdir()
    (repo / "snapshots").symlink_to(outside)
    with pytest.raises(hub.DownloadError, match="outside the cache"):
        hub.download_url(url, cache_dir=cache, progress=False)
    assert list(outside.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# Killed downloads: their temporary files are removed by the next download; live ones never are
# ----------------------------------------------------------------------------------------------------------


needs_flock = pytest.mark.skipif(hub.fcntl is None, reason="orphans are found by their missing flock (POSIX)")


@needs_flock
def test_sigkill_during_a_download_then_a_clean_retry(weights_server, cache):
    Reply = weights_server.Reply
    url = weights_server.serve("/w.safetensors", Reply(GOOD, stall_after=len(HALF)), Reply(GOOD))
    code = ("import sys; from moezoo.zoo import hub; "
            "hub.download_url(sys.argv[1], cache_dir=sys.argv[2], progress=False)")
    child = subprocess.Popen([sys.executable, "-c", code, url, str(cache)])
    try:
        (orphan,) = _wait_for(lambda: [p for p in _temporary_files(cache) if p.stat().st_size == len(HALF)],
                              "the child to write the half it received")
        child.kill()  # SIGKILL: no handler, no finally
        child.wait(WAIT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -9 and orphan.exists()
    path = hub.download_url(url, cache_dir=cache, progress=False)
    assert path.read_bytes() == GOOD
    assert _temporary_files(cache) == []


def test_a_live_download_is_never_removed_by_another(weights_server, cache):
    Reply = weights_server.Reply
    slow = weights_server.serve("/slow.safetensors", Reply(GOOD, stall_after=len(HALF)))
    other = safetensors.torch.save({"x": torch.zeros(8)})
    fast = weights_server.serve("/fast.safetensors", Reply(other))
    done = {}
    thread = threading.Thread(target=lambda: done.update(path=hub.download_url(slow, cache_dir=cache, progress=False)))
    thread.start()
    try:
        (live,) = _wait_for(lambda: [p for p in _temporary_files(cache) if p.stat().st_size > 0], "the live download")
        os.utime(live, (0, 0))  # however old it looks, its writer holds the lock
        assert hub.download_url(fast, cache_dir=cache, progress=False).read_bytes() == other
        assert live.exists()
    finally:
        weights_server.release.set()
        thread.join(WAIT_S)
    assert done["path"].read_bytes() == GOOD
    assert _temporary_files(cache) == []


@needs_flock
def test_the_orphan_rule(cache):
    def temp(name: str, body: bytes, age_s: float = 0.0) -> Path:
        path = cache / f".{name}.0123456789ab.incomplete"
        path.write_bytes(body)
        os.utime(path, (time.time() - age_s,) * 2)
        return path

    dead_writer = temp("a", b"half a file")
    new_and_empty = temp("b", b"")  # a writer may be between creating and locking it
    old_and_empty = temp("c", b"", age_s=hub.ORPHAN_GRACE_S + 1)
    locked = temp("d", b"being written", age_s=10 * hub.ORPHAN_GRACE_S)
    not_ours = [cache / "x.incomplete", cache / ".x.incomplete", cache / ".x.0123456789AB.incomplete"]
    for path in not_ours:
        path.write_bytes(b"1")
    with open(locked, "ab") as writer:
        hub.fcntl.flock(writer.fileno(), hub.fcntl.LOCK_EX)
        removed = hub.remove_orphaned_downloads(cache)
    assert sorted(removed) == sorted([dead_writer, old_and_empty])
    assert {p for p in cache.iterdir()} == {new_and_empty, locked, *not_ours}


# ----------------------------------------------------------------------------------------------------------
# The Hub: offline or unreachable is an error at once
# ----------------------------------------------------------------------------------------------------------


def test_an_unreachable_hub_fails_at_once_naming_what_was_tried(hang_up_hub, cache):
    with pytest.raises(hub.DownloadError) as info:
        create_model("hf-hub:org/repo@v1", cache_dir=cache, progress=False)
    message = str(info.value)
    assert "could not reach the Hugging Face Hub for org/repo@v1 config.json" in message
    assert f"{hang_up_hub.url}/org/repo/resolve/v1/config.json" in message and "HF_HUB_OFFLINE=1" in message
    assert len(hang_up_hub.requests_for("/org/repo/")) == 1  # one HEAD; hf_hub_download alone retries ~24 s


def test_a_silent_hub_is_bounded_by_the_etag_timeout(fake_hub, cache, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_ETAG_TIMEOUT", 0.3)
    fake_hub.serve("/org/repo/resolve/main/config.json", fake_hub.Reply(b"{}", stall_before_headers=True))
    with pytest.raises(hub.DownloadError, match="could not reach the Hugging Face Hub.*Timeout"):
        create_model("hf-hub:org/repo", cache_dir=cache, progress=False)
    assert fake_hub.paths_requested("HEAD", "/org/") == ["/org/repo/resolve/main/config.json"]


@pytest.mark.parametrize("status", [404, 500])
def test_hub_http_errors_are_raised_without_retries(fake_hub, cache, status):
    fake_hub.serve("/org/repo/resolve/main/config.json", fake_hub.Reply(b"{}", status=status))
    with pytest.raises(HfHubHTTPError, match=str(status)):
        create_model("hf-hub:org/repo", cache_dir=cache, progress=False)
    assert fake_hub.paths_requested("HEAD", "/org/") == ["/org/repo/resolve/main/config.json"]
    assert fake_hub.paths_requested("GET", "/org/") == []


@pytest.mark.parametrize("how", ["env", "local_files_only"])
def test_offline_hub_file_not_cached_is_a_clear_error_without_a_request(fake_hub, cache, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.NotCachedError, match="org/repo config.json is not in the cache") as info:
        create_model("hf-hub:org/repo", cache_dir=cache, local_files_only=how == "local_files_only")
    assert "offline mode is on" in str(info.value)
    assert fake_hub.requests == []


def test_a_cached_hub_file_is_used_offline(fake_hub, cache, monkeypatch):
    fake_hub.serve_hub_file("org/repo", "main", "model.safetensors", GOOD)
    path = hub.hf_hub_file("org/repo", "model.safetensors", cache_dir=cache, progress=False)
    assert path.read_bytes() == GOOD
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests_before = len(fake_hub.requests)
    assert hub.hf_hub_file("org/repo", "model.safetensors", cache_dir=cache).read_bytes() == GOOD
    assert len(fake_hub.requests) == requests_before
