"""End to end in a real headless Chromium (Debian's ``chromium`` driven by Playwright): open the demo, go to the
text-to-image tab, type a prompt, click Generate, wait for the image and the routing pictures, save a
screenshot under the test's output folder. The page must not fetch anything from outside this machine."""

from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing: install Debian's browser with `apt-get install -y chromium`",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: `pip install playwright`")

from moezoo.app.demo import build_demo, launch_demo  # noqa: E402

# gradio's queue calls pandas in ways pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def url(tiny_loader):
    demo = build_demo(load_pipeline=tiny_loader, cache_examples=False)
    _, url, _ = launch_demo(demo, prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


def test_prompt_generate_and_screenshot(url, tmp_path):
    outside = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: outside.append(r.url)
                    if urlparse(r.url).hostname not in ("127.0.0.1", "localhost") and r.url.startswith("http") else None)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.get_by_role("tab", name="Shapes: text → image").click()
            prompt = page.locator("#shapes-input-0 textarea")
            prompt.fill("a small blue square at the top")
            page.locator("#shapes-run").click()
            # the generated image, then the routing map and the notes that come with it
            output = page.locator("#shapes-output img")
            output.wait_for(state="visible")
            page.wait_for_function("img => img.complete && img.naturalWidth === 256", arg=output.element_handle())
            page.locator("#shapes-map img").wait_for(state="visible")
            page.locator("#shapes-notes", has_text="Busiest").wait_for(state="visible")
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    assert outside == [], f"the page fetched from outside this machine: {outside}"
