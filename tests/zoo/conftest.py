"""Local HTTP servers on 127.0.0.1 (random ports) for the download tests: no test here touches the internet.

``weights_server`` serves what a test registers per path (``server.serve(path, server.Reply(...), ...)``):
any body, status and headers, a Content-Length that matches, lies or is left out, and a body that stalls
part-way until the test (or the fixture's teardown) releases it. ``fake_hub`` is the same server standing in
for the Hugging Face Hub (huggingface_hub's endpoint points at it), so ``hf_hub_download`` runs for real;
``hang_up_hub`` is a Hub host that reads each request and hangs up without an answer.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

STALL_LIMIT_S = 20.0  # a stalled reply never outlives a test by more than this, even if nobody releases it


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Online, and a default cache in tmp_path whatever the caller's environment says (the download tests use it
    for every test: ``pytestmark = pytest.mark.usefixtures("online")``)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture
def cache(tmp_path) -> Path:
    """An empty cache folder for ``cache_dir=``."""
    path = tmp_path / "cache"
    path.mkdir()
    return path


@dataclass
class Reply:
    """One HTTP reply. ``length``: the Content-Length sent; -1 sends the body's true length, None sends no
    header (the end of the body is then the closed connection). ``stall_after``: send that many bytes of
    the body, then wait for ``server.release`` before the rest. ``stall_before_headers``: wait before
    answering at all."""

    body: bytes = b""
    status: int = 200
    length: int | None = -1
    stall_after: int | None = None
    stall_before_headers: bool = False
    headers: dict[str, str] = field(default_factory=dict)


NOT_FOUND = Reply(b"not found", status=404)


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True
    Reply = Reply  # for the tests (a conftest is not imported by name)

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies: dict[str, list[Reply]] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, User-Agent), in arrival order
        self.release = threading.Event()  # set to let stalled replies go on
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def serve(self, path: str, *replies: Reply) -> str:
        """Answer ``path`` with ``replies`` in turn, the last one from then on; returns the full URL."""
        self.replies[path] = list(replies)
        return self.url + path

    def next_reply(self, path: str) -> Reply:
        replies = self.replies.get(path)
        if not replies:
            return NOT_FOUND
        return replies.pop(0) if len(replies) > 1 else replies[0]

    def serve_hub_file(self, repo_id: str, revision: str, filename: str, body: bytes) -> None:
        """Answer as the Hub does for a file: its bytes, the revision's commit and an ETag (the sha256)."""
        headers = {"X-Repo-Commit": "c0ffee" * 6 + "c0ff", "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}
        self.serve(f"/{repo_id}/resolve/{revision}/{filename}", Reply(body, headers=headers))

    def paths_requested(self, method: str = "GET", prefix: str = "/") -> list[str]:
        return [path for m, path, _ in self.requests if m == method and path.startswith(prefix)]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self._answer(with_body=True)

    def do_HEAD(self):
        self._answer(with_body=False)

    def _answer(self, with_body: bool):
        server: LocalServer = self.server
        server.requests.append((self.command, self.path, self.headers.get("User-Agent", "")))
        reply = server.next_reply(self.path)
        if reply.stall_before_headers:
            self._stall()
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.length is not None:
            self.send_header("Content-Length", str(len(reply.body) if reply.length == -1 else reply.length))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if not with_body:
            return
        try:
            if reply.stall_after is None:
                self.wfile.write(reply.body)
                return
            self.wfile.write(reply.body[: reply.stall_after])
            self.wfile.flush()
            self._stall()
            self.wfile.write(reply.body[reply.stall_after:])
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) or was killed
            pass

    def _stall(self):
        self.server.release.wait(STALL_LIMIT_S)

    def log_message(self, *args):  # keep pytest output clean
        pass


def _running(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def weights_server():
    yield from _running(LocalServer())


def _point_huggingface_hub_at(monkeypatch, url: str) -> None:
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def fake_hub(monkeypatch):
    """A LocalServer that huggingface_hub takes for the Hub: register ``/<org>/<repo>/resolve/<rev>/<file>``."""
    server = LocalServer()
    _point_huggingface_hub_at(monkeypatch, server.url)
    yield from _running(server)


class HangUpServer:
    """Reads each request and closes the connection without answering: a host that is up but answers no
    HTTP. Keeps the request lines (a retry shows as a second one)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.request_lines: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    self.request_lines.append(conn.recv(4096).decode("latin-1").split("\r\n", 1)[0])
                except OSError:
                    pass

    def requests_for(self, path_part: str) -> list[str]:
        return [line for line in self.request_lines if path_part in line]

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def hang_up_hub(monkeypatch):
    server = HangUpServer()
    _point_huggingface_hub_at(monkeypatch, server.url)
    try:
        yield server
    finally:
        server.close()
