"""The Gradio page in a real browser: Debian's headless Chromium driven by Playwright.

Skips (with the reason) when /usr/bin/chromium ($MELANOMA_CHROMIUM) or the playwright package is missing, unless
MELANOMA_REQUIRE_BROWSER=1 (CI), where a missing browser is a failure. Screenshot:
test-artifacts/app.png (repo-root relative, git-ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import EXAMPLE_FILES, REPO
from melanoma_detector.app.ui import DEFAULT_OPACITY

CHROMIUM = Path(os.environ.get("MELANOMA_CHROMIUM", "/usr/bin/chromium"))  # Debian's package
SCREENSHOT = REPO / "test-artifacts" / "app.png"
STEP_MS = 90_000  # one model run on a busy 2-core machine, with room to spare

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("MELANOMA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"MELANOMA_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")  # session, listed first: a missing browser skips before a server starts
def browser_page():
    _need(CHROMIUM.exists(), f"{CHROMIUM} not found (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "the playwright Python package is not installed (pip install playwright)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.set_default_timeout(STEP_MS)
            yield page
        finally:
            browser.close()


def test_upload_shows_risk_and_heatmap(browser_page, live_server):
    from playwright.sync_api import expect

    page = browser_page
    page.goto(live_server + "/", wait_until="domcontentloaded")
    # the disclaimer and the model-card link are on the page before anything is uploaded
    expect(page.get_by_text("Research software, not a medical device").first).to_be_visible()
    link = page.locator("#disclaimer a[href*='model-card']")
    expect(link).to_have_count(1)

    sample = next(p for p in EXAMPLE_FILES if p.name.startswith("malignant"))
    page.locator("#upload input[type=file]").set_input_files(str(sample))

    risk = page.locator("#risk-level")
    expect(risk).to_contain_text("Risk level:", timeout=STEP_MS)
    level = risk.locator(".risk-panel").get_attribute("data-level")
    assert level in ("Low", "Moderate", "High")
    heatmap = page.locator("#heatmap img")
    expect(heatmap).to_be_visible(timeout=STEP_MS)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=heatmap.element_handle(),
                           timeout=STEP_MS)
    expect(page.locator("#recommendation")).to_contain_text("Recommendation")
    expect(page.locator("#probabilities")).to_contain_text("malignant")

    # moving the opacity slider re-renders the overlay from the kept Grad-CAM (no new model run)
    before = heatmap.get_attribute("src")
    slider = page.locator("#opacity input[type=range]")
    slider.fill("0.9")
    slider.dispatch_event("change")
    page.wait_for_function(
        "([sel, old]) => { const el = document.querySelector(sel); return el && el.getAttribute('src') !== old; }",
        arg=["#heatmap img", before], timeout=STEP_MS,
    )
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=heatmap.element_handle(),
                           timeout=STEP_MS)
    # and back: the first overlay's file, served again (a re-render never rewrites a file being fetched)
    slider.fill(str(DEFAULT_OPACITY))
    slider.dispatch_event("change")
    page.wait_for_function(
        "([sel, old]) => { const el = document.querySelector(sel); return el && el.getAttribute('src') === old; }",
        arg=["#heatmap img", before], timeout=STEP_MS,
    )
    expect(risk).to_contain_text(f"Risk level: {level}")

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000

    # the model card link works
    response = page.request.get(live_server + "/model-card")
    assert response.status == 200 and "Model card" in response.text()


def test_non_dermoscopy_image_shows_cannot_assess(browser_page, live_server, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    flat = tmp_path / "flat.png"
    Image.new("RGB", (300, 200), (90, 140, 200)).save(flat)
    page = browser_page
    page.goto(live_server + "/", wait_until="domcontentloaded")
    page.locator("#upload input[type=file]").set_input_files(str(flat))
    risk = page.locator("#risk-level")
    expect(risk).to_contain_text("Cannot assess this image", timeout=STEP_MS)
    expect(risk).to_contain_text("uniform")
    expect(page.locator("#recommendation")).to_contain_text("What to do")
