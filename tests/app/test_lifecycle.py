"""The demo's temporary folder (/tmp/moezoo-demo-*: videos, example files, example cache) goes when the app
ends: after SIGTERM, after Ctrl-C (SIGINT) and at a normal exit. Each case runs the real `python -m moezoo.app`
(or a plain interpreter) in a subprocess whose TMPDIR is the test's own folder, so the folder is found without
looking at anyone else's /tmp, and every wait is bounded."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

STARTUP_SECONDS = 120  # loading the bundled models and writing the example files: ~8 s on an idle machine
EXIT_SECONDS = 30


def demo_folders(tmp_dir):
    return sorted(tmp_dir.glob("moezoo-demo-*"))


def start(args, tmp_dir):
    environment = {**os.environ, "TMPDIR": str(tmp_dir), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen([sys.executable, *args], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_until_serving(process, url: str) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode} before serving:\n{process.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    process.kill()
    pytest.fail(f"the app did not serve {url} within {STARTUP_SECONDS} s:\n{process.communicate()[0]}")


def stop(process, signum) -> int:
    process.send_signal(signum)
    try:
        process.wait(timeout=EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the app was still running {EXIT_SECONDS} s after signal {signum}:\n{process.communicate()[0]}")
    return process.returncode


@pytest.mark.parametrize("signum, returncode", [
    (signal.SIGTERM, -signal.SIGTERM),  # cleaned up, then ended by SIGTERM as before (what a supervisor expects)
    (signal.SIGINT, 0),  # Ctrl-C: gradio closes the server and the app returns normally
], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_app_removes_its_folder(tmp_path, free_port, signum, returncode):
    process = start(["-m", "moezoo.app", "--port", str(free_port)], tmp_path)
    try:
        wait_until_serving(process, f"http://127.0.0.1:{free_port}/")
        assert len(demo_folders(tmp_path)) == 1
        assert stop(process, signum) == returncode
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert demo_folders(tmp_path) == []


def test_a_normal_exit_removes_the_folder(tmp_path):
    code = "from moezoo.app.demo import _session_folder; import os; print(os.path.isdir(_session_folder()))"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=EXIT_SECONDS + STARTUP_SECONDS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert demo_folders(tmp_path) == []


def test_ctrl_c_before_gradio_waits_ends_the_app_normally(monkeypatch):
    """A Ctrl-C that lands between "serving" and gradio's own wait loop (where gradio turns it into a close)
    used to escape as an uncaught KeyboardInterrupt (exit -2 on a slow CI machine); main() closes the demo and
    returns."""
    from moezoo.app import __main__ as entry
    from moezoo.app import demo as demo_module

    closed = []

    class FakeDemo:
        is_running = True

        def close(self):
            closed.append(True)

    def interrupted_launch(demo, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "build_demo", FakeDemo)
    monkeypatch.setattr(demo_module, "launch_demo", interrupted_launch)
    try:
        entry.main(["--port", "7999"])
    except KeyboardInterrupt:  # caught here so that the failure does not stop the whole pytest session
        pytest.fail("main() let the KeyboardInterrupt escape")
    assert closed == [True]


def test_a_sigint_during_launch_is_kept_until_launch_returns():
    """The race behind a CI hang: SIGINT lands while gradio's launch is still finishing. The app's handler only
    sets a flag, launch completes, and the wait after it returns at once."""
    import threading
    from types import SimpleNamespace

    from moezoo.app.__main__ import serve_until_interrupted

    before = signal.getsignal(signal.SIGINT)
    demo = SimpleNamespace(is_running=True)
    watchdog = threading.Timer(10, lambda: setattr(demo, "is_running", False))  # never hang the suite
    watchdog.start()
    finished = []

    def launch_interrupted_midway():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, inside launch
        finished.append("launch finished")

    started = time.monotonic()
    try:
        serve_until_interrupted(demo, launch_interrupted_midway)
    except KeyboardInterrupt:
        pytest.fail("the SIGINT became a KeyboardInterrupt inside launch")
    finally:
        watchdog.cancel()
    assert finished == ["launch finished"] and time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGINT) is before
