"""moezoo.app: the Gradio demo (one tab per pipeline, with routing pictures) and the MoE quickstart.

    from moezoo.app import build_demo, launch_demo
    demo = build_demo()          # a gr.Blocks
    launch_demo(demo)            # what `python -m moezoo.app` and `make demo` run

``build_demo`` and the rest of :mod:`moezoo.app.demo` are imported on first use: importing gradio takes
seconds, and ``moezoo.app.quickstart`` and ``moezoo.app.pictures`` do not need it.
"""

from __future__ import annotations

__all__ = ["build_demo", "launch_demo", "TABS", "Tab"]


def __getattr__(name: str):
    if name in __all__:
        from . import demo

        return getattr(demo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
