"""The studio page in a real browser: headless Chromium (Debian's `chromium` package) driven by Playwright against
a real `fluxion serve` subprocess on fluxion-tiny. Generate (with live previews), an edit with two dropped
references (reordered), an inpaint with a painted mask, and a cancel.

Set FLUXION_STUDIO_SHOTS=DIR to also save desktop and phone screenshots there (docs/ uses them).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from serve_fixtures import Proc, free_port

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("FLUXION_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(
        "no Chromium: install Debian's package (apt-get install -y chromium) to run the browser test",
        allow_module_level=True,
    )

TIMEOUT_MS = 240_000  # 2 shared CPU cores: a fluxion-tiny job can take tens of seconds under load


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("studio")
    port = free_port()
    proc = Proc(
        ["--db", f"sqlite:///{d}/jobs.db", "--port", str(port), "--auth", "off"], d / "serve.log", port
    )
    try:
        proc.wait_ready(timeout=240)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def _open(browser, server, **ctx):
    page = browser.new_context(**ctx).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    return page, errors


def _fill(page, prompt: str, steps: int, size: str = "128x128") -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Size", exact=True).select_option(size)
    page.get_by_label("Steps", exact=True).fill(str(steps))
    page.get_by_label("Seed", exact=True).fill("7")
    page.get_by_label("Lock seed").check()


def _history_ready(page, text: str | None = None):
    """The newest Ready card in the history (waits for it and for its image to load)."""
    sel = "#history li[data-status='Ready']"
    if text is not None:
        sel += f":has-text('{text}')"
    card = page.locator(sel).first
    card.wait_for()
    img = card.locator("img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    return card


DROP_TWO = """async () => {
  // Two PNGs made in the page (red, then blue), dropped on the drop zone like files from the desktop.
  const dt = new DataTransfer();
  for (const [name, colour] of [["red.png", "#d22"], ["blue.png", "#22d"]]) {
    const c = document.createElement("canvas"); c.width = 128; c.height = 128;
    const g = c.getContext("2d"); g.fillStyle = colour; g.fillRect(0, 0, 128, 128);
    const blob = await new Promise((r) => c.toBlob(r, "image/png"));
    dt.items.add(new File([blob], name, { type: "image/png" }));
  }
  const zone = document.getElementById("drop");
  zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
  zone.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
}"""


def test_studio_generate_edit_inpaint_cancel(server, browser):
    page, errors = _open(browser, server, viewport={"width": 1280, "height": 900})
    assert page.title() == "fluxion studio"

    # Generate: a live preview appears while it runs, then the final image in the history.
    _fill(page, "a red fox in the snow", steps=6)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#running img.preview[data-previews]")
    preview = page.locator("#running img.preview").first.get_attribute("src")
    assert preview.startswith("data:image/png;base64,")
    card = _history_ready(page)
    assert "seed 7" in card.inner_text()
    jobs = httpx.get(server.url + "/v1/jobs").json()["jobs"]
    assert jobs[0]["status"] == "Ready" and jobs[0]["params"]["prompt"] == "a red fox in the snow"
    sample = httpx.get(jobs[0]["result"]["sample"])
    assert sample.headers["content-type"] == "image/png"

    # Edit: two dropped references, reordered with the keyboard-reachable buttons (order matters).
    page.evaluate(DROP_TWO)
    refs = page.locator("#refs li img")
    refs.nth(1).wait_for()
    assert refs.nth(0).get_attribute("alt").endswith("red.png")
    page.get_by_role("button", name="Move reference 1 later").click()
    assert refs.nth(0).get_attribute("alt").endswith("blue.png")
    assert refs.nth(1).get_attribute("alt").endswith("red.png")
    _fill(page, "make it purple", steps=3, size="match")
    page.get_by_role("button", name="Generate").click()
    _history_ready(page, "2 input(s)")

    # Inpaint: paint on reference 1's mask; the job carries the image and the mask.
    page.get_by_label("Inpaint reference 1").check()
    canvas = page.locator("#maskcanvas")
    canvas.wait_for()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=5)
    page.mouse.up()
    page.get_by_role("button", name="Move reference 2 earlier").focus()  # keyboard path exists
    _fill(page, "a yellow square", steps=3, size="match")
    page.get_by_role("button", name="Generate").click()
    _history_ready(page, "2 input(s) · inpaint")  # image + second reference, masked
    page.get_by_label("Inpaint reference 1").uncheck()
    for _ in range(2):
        page.get_by_role("button", name="Remove reference 1").click()

    # Cancel: a long job, cancelled from its card while it runs.
    _fill(page, "a very long job", steps=50, size="256x256")
    page.get_by_role("button", name="Generate").click()
    running = page.locator("#running li.card").first
    running.wait_for()
    page.wait_for_selector("#running progress:not([value='0'])")
    shots = os.environ.get("FLUXION_STUDIO_SHOTS")
    if shots:  # the README's picture: a job running with its live preview, progress, ETA and cancel
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.wait_for_selector("#running img.preview[data-previews]")
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(Path(shots) / "studio-desktop.png"))
    running.get_by_role("button", name="Cancel").click()
    cancelled = page.locator("#history li[data-status='Error']:has-text('cancelled')").first
    cancelled.wait_for()
    assert page.locator("#running li.card").count() == 0

    if shots:
        phone, _ = _open(browser, server, viewport={"width": 390, "height": 844}, is_mobile=True)
        phone.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
        phone.screenshot(path=str(Path(shots) / "studio-phone.png"))
    assert errors == []
