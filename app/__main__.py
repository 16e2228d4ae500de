"""``python -m moezoo.app`` (and ``make demo``): serve the Gradio demo on http://127.0.0.1:7860, analytics off.

    python -m moezoo.app [--port 7860] [--host 127.0.0.1]

Stop it with Ctrl-C or SIGTERM: either way its temporary folder (``$TMPDIR/moezoo-demo-*``: videos, example
files, example cache) is removed.

The MoE quickstart that ``make demo`` ran before the app landed is ``python -m moezoo.app.quickstart``.
"""

import argparse
import os

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
        demo = build_demo()
        launch_demo(demo, server_name=args.host, server_port=args.port)
    except KeyboardInterrupt:
        # Gradio turns Ctrl-C into a clean close only once it waits in its own loop; a Ctrl-C that arrives while
        # the models load, or between "serving" and that loop, lands here instead, and ends the app just as
        # normally (the temporary folder goes at exit either way).
        if demo is not None:
            demo.close()


if __name__ == "__main__":
    main()
