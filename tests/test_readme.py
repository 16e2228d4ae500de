"""The README is true: every Python block in it runs as written, and every repository path and ``moezoo.`` name
it (or docs/performance.md) mentions exists.

Each ```python block runs on its own (a fresh namespace: it must import what it uses) in an empty working folder,
offline (``HF_HUB_OFFLINE=1``), with the test session's one torch thread. A block may be skipped only when its
first line is ``# needs: official checkpoint`` or ``# needs: Hugging Face Hub``; the skip says which block and
why. The block that scripts the demo with gradio_client talks to the real demo (the bundled weights of the tabs it
calls), served here on a free port: the block's ``http://127.0.0.1:7860/`` is replaced by that server's address.
Shell blocks are not run.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = (README, ROOT / "docs" / "performance.md")
SKIP_MARKERS = ("official checkpoint", "Hugging Face Hub")
DEMO_URL = "http://127.0.0.1:7860/"  # where `make demo` serves; the demo block's address
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^# needs: (.+?)\s*$")


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the opening fence, 1-based
    heading: str
    code: str

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.heading})"


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block of a markdown text, with the heading it sits under. An unclosed fence is an error."""
    blocks, heading, open_at, language, lines = [], "top", None, "", []
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if open_at is None:
            if line.startswith("#") and not line.startswith("#!"):
                heading = line.lstrip("#").strip()
            elif fence:
                open_at, language, lines = number, fence.group(1), []
        elif line.startswith("```"):
            assert line.strip() == "```", f"README.md:{number}: a fence inside the block opened at line {open_at}"
            blocks.append(Block(language, open_at, heading, "\n".join(lines) + "\n"))
            open_at = None
        else:
            lines.append(line)
    assert open_at is None, f"README.md:{open_at}: a fenced block that is never closed"
    return blocks


PYTHON_BLOCKS = [b for b in fenced_blocks(README.read_text()) if b.language == "python"]


def test_every_fence_names_its_language():
    blocks = fenced_blocks(README.read_text())
    unnamed = [b.name for b in blocks if not b.language]
    assert not unnamed, f"blocks without a language (python, bash, or text for plain listings): {unnamed}"
    assert len(PYTHON_BLOCKS) >= 8, "the README's examples are its python blocks"


def skip_marker(block: Block) -> str | None:
    """The block's ``# needs: ...`` marker, checked to be one the README may use; None for a block that runs."""
    first = block.code.splitlines()[0]
    marked = MARKER.match(first)
    elsewhere = [line for line in block.code.splitlines()[1:] if MARKER.match(line.strip())]
    assert not elsewhere, f"{block.name}: a '# needs:' marker counts only on the block's first line"
    if marked is None:
        return None
    assert marked.group(1) in SKIP_MARKERS, (
        f"{block.name}: '# needs: {marked.group(1)}' is not a skip reason this README may use; "
        f"accepted: {', '.join(SKIP_MARKERS)}")
    return marked.group(1)


@pytest.fixture(scope="module")
def served_demo():
    """The real demo (bundled weights) on a free port, serving the tabs the README's client block calls."""
    from moezoo.app.demo import TABS, build_demo, launch_demo

    client_code = "".join(b.code for b in PYTHON_BLOCKS if DEMO_URL in b.code)
    tabs = [tab for tab in TABS if f'api_name="/{tab.api_name}"' in client_code]
    assert tabs, "the demo block calls no tab of moezoo.app.demo.TABS"
    demo = build_demo(tabs, cache_examples=False)
    _, url, _ = launch_demo(demo, server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


# gradio's queue calls pandas in ways pandas 3 deprecates; not ours to fix (as tests/app/test_client.py).
@pytest.mark.filterwarnings("ignore:::gradio.queueing")
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: f"line{b.line}")
def test_readme_python_block_runs(block, request, tmp_path, monkeypatch):
    marker = skip_marker(block)
    if marker is not None:
        pytest.skip(f"{block.name} needs {marker}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    code = block.code
    if DEMO_URL in code:
        code = code.replace(DEMO_URL, request.getfixturevalue("served_demo"))
    # The code object is named after the README line, so a traceback points into the README.
    exec(compile(code, block.name, "exec"), {"__name__": f"readme_line{block.line}"})


# ---------------------------------------------------------------------------------------------- names and paths

REPO_PATH = re.compile(r"(?<![\w/.-])((?:kernels|zoo|encoders|pipelines|training|app|bench|tests|docs)/[\w./-]*\w)")
DOTTED_NAME = re.compile(r"`(moezoo(?:\.\w+)+)")


def mentioned(pattern: re.Pattern) -> set[tuple[str, str]]:
    return {(doc.name, m.group(1)) for doc in DOCS for m in pattern.finditer(doc.read_text())}


def test_every_repository_path_mentioned_exists():
    missing = [f"{doc}: {path}" for doc, path in sorted(mentioned(REPO_PATH)) if not (ROOT / path).exists()]
    assert not missing, f"paths that do not exist: {missing}"


def resolves(dotted: str) -> bool:
    """Whether ``moezoo.a.b.Name.attr`` names something: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_moezoo_name_mentioned_resolves():
    missing = [f"{doc}: {name}" for doc, name in sorted(mentioned(DOTTED_NAME)) if not resolves(name)]
    assert not missing, f"moezoo names that do not exist: {missing}"


def test_limits_the_readme_quotes_are_the_code_s():
    """The numbers the README promises users (limits, chunk sizes, timeouts) are the ones the code uses."""
    from moezoo.app.demo import MAX_PIXELS
    from moezoo.pipelines import DiTMoEPipeline, DiTMoEVideoPipeline, FusionPipeline
    from moezoo.pipelines.dit_moe import DEFAULT_SAMPLING
    from moezoo.zoo.hub import DOWNLOAD_TIMEOUT_S
    from moezoo.zoo.registry import MAX_MODEL_PARTS, MAX_PARAMETERS

    text = " ".join(README.read_text().split())  # one line: quoted phrases may wrap
    quoted = [
        f"a photo over {MAX_PIXELS / 1e6:g} megapixels",
        f"a connection silent for {DOWNLOAD_TIMEOUT_S:g} s",
        f"default max_parameters={MAX_PARAMETERS:.0e}".replace("e+0", "e"),
        f"more than {MAX_MODEL_PARTS:,} modules and parameter tensors",
        (f"({DiTMoEPipeline.max_batch_size} images; {DiTMoEVideoPipeline.max_batch_size} clips; "
         f"{FusionPipeline.max_batch_size} fusion pairs)"),
        (f"Without a recommendation: flow-match Euler or DDIM, {DEFAULT_SAMPLING['num_inference_steps']} steps, "
         f"guidance {DEFAULT_SAMPLING['guidance_scale']:g}."),
    ]
    missing = [phrase for phrase in quoted if phrase not in text]
    assert not missing, f"the README does not quote the code's values: {missing}"
