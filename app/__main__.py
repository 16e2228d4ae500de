"""``python -m moezoo.app``: the demo. Until the Gradio app lands this runs the end-to-end MoE quickstart."""

from .quickstart import main

main()
