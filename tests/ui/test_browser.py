"""A real browser (Playwright + Debian's headless Chromium) drives the lab like a person would."""
from __future__ import annotations

import shutil
import time

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")]


@pytest.fixture
def page(lab_url):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(lab_url)
        page.wait_for_selector("#run-btn")
        yield page
        browser.close()


def _choose(page, label: str, value: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.click()
    box.fill(value)
    page.keyboard.press("Enter")
    page.locator("h1").first.click()  # leave the dropdown


def _traces(page) -> int:
    return page.locator("#loss-plot .scatterlayer .trace").count()


def _points(page) -> int:
    return page.evaluate("""() => {
        const el = document.querySelector('#loss-plot .js-plotly-plot');
        if (!el || !el.data) return 0;
        return el.data.reduce((n, t) => n + (t.y ? t.y.length : 0), 0);
    }""")


def test_run_then_stop_in_a_real_browser(page, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("screenshots")
    _choose(page, "Preset", "tiny-random")
    page.wait_for_function("() => document.querySelector('#status') !== null")
    time.sleep(1.0)  # the preset fills the controls
    page.click("#run-btn")
    page.wait_for_function("() => document.querySelector('#loss-plot .scatterlayer .trace') !== null",
                           timeout=120_000)
    page.screenshot(path=str(tmp_path / "mid-run.png"), full_page=True)
    page.wait_for_selector("#status :text('finished')", timeout=180_000)
    table = page.locator("#ppl-table").inner_text()
    assert "dense" in table and "ebft" in table
    assert _traces(page) > 0
    page.screenshot(path=str(tmp_path / "finished.png"), full_page=True)

    # a second, long run: Stop must end it and the updates must cease
    page.click("#acc-ebft .label-wrap")
    epochs = page.get_by_label("Epochs per block")
    epochs.wait_for(state="visible")
    page.wait_for_timeout(1000)  # the accordion mounts its inputs as it opens
    for _ in range(3):
        epochs.fill("400")
        epochs.press("Tab")  # commit the value (Gradio reads it on blur)
        page.wait_for_timeout(500)
        if epochs.input_value() == "400":
            break
    assert epochs.input_value() == "400"
    page.click("#run-btn")
    page.wait_for_selector("#status :text('running')", timeout=60_000)
    page.wait_for_selector("#status :text('ebft')", timeout=120_000)
    page.wait_for_function("() => { const el = document.querySelector('#loss-plot .js-plotly-plot');"
                           " return el && el.data && el.data.length > 0; }", timeout=120_000)
    page.click("#stop-btn")
    page.wait_for_selector("#status :text('cancelled')", timeout=120_000)
    settled = _points(page)
    time.sleep(3)
    assert _points(page) == settled, "updates went on after Stop"
    page.screenshot(path=str(tmp_path / "stopped.png"), full_page=True)
    print("screenshots in", tmp_path)
