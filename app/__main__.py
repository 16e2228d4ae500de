"""``python -m moezoo.app`` (and ``make demo``): serve the Gradio demo on http://127.0.0.1:7860, analytics off.

    python -m moezoo.app [--port 7860] [--host 127.0.0.1]

Stop it with Ctrl-C or SIGTERM: either way its temporary folder (``$TMPDIR/moezoo-demo-*``: videos, example
files, example cache) is removed.

The MoE quickstart that ``make demo`` ran before the app landed is ``python -m moezoo.app.quickstart``.
"""

import argparse
import os
import signal
import threading

# Before gradio is imported: no usage statistics, no version check, no telemetry of any kind.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Serve the moezoo Gradio demo.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default: 7860, or the next free one; also GRADIO_SERVER_PORT)")
    args = parser.parse_args(argv)

    from .demo import build_demo, launch_demo

    demo = None
    try:
        demo = build_demo()  # a Ctrl-C while the models load ends the app here (KeyboardInterrupt)
        serve_until_interrupted(demo, lambda: launch_demo(demo, server_name=args.host, server_port=args.port,
                                                          prevent_thread_lock=True))
    except KeyboardInterrupt:
        pass
    finally:
        if demo is not None:
            demo.close()  # the temporary folder goes at exit, after this


def serve_until_interrupted(demo, launch) -> None:
    """``launch()`` (which returns once the server runs), then wait until Ctrl-C / SIGINT or until the demo stops.

    Gradio's own wait turns Ctrl-C into a KeyboardInterrupt, and one that lands while ``launch`` is still
    finishing (after the server already answers) can be lost there, leaving the app waiting for good (seen on a
    CI machine). Here SIGINT only sets a flag, whenever it comes, and the flag is read after ``launch`` returns."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        launch()
        while not stop.wait(0.1) and demo.is_running:
            pass
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    main()
