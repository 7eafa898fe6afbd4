"""The search page in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python package;
Playwright's own browser download is not used): type a query and see thumbnails, "more like this",
a photo as the query (file input and drag-and-drop), the score threshold, the photo viewer, the token
flow, and no console errors (which also catches a content-security policy blocking the page's own
script). Skipped where chromium is missing, unless CI is set: there it fails."""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from test_serve import COLOURS, TOKEN, make_layout

from cliptune.deploy.embedders import OnnxEmbedder
from cliptune.deploy.index import Index

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        reason = f"{CHROMIUM} is missing (Debian's chromium package: scripts/setup.sh --dev installs it)"
        if _in_ci():
            pytest.fail("CI=true but " + reason)
        pytest.skip(reason)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if _in_ci():
            pytest.fail("CI=true but playwright is not installed (pip install 'cliptune[dev]')")
        pytest.skip("playwright is not installed (pip install 'cliptune[dev]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_clip_dir) -> Path:
    from cliptune.deploy.export import export_model

    root = tmp_path_factory.mktemp("browser")
    onnx_dir = export_model(str(tiny_clip_dir), root / "export", onnx=True).out_dir / "onnx"
    Index.build(make_layout(root), root / "index", OnnxEmbedder(onnx_dir), progress=False)
    return root / "index"


@pytest.fixture(scope="module")
def server(index_dir):
    from cliptune.deploy.serve import ServerThread, create_app

    with ServerThread(create_app(index_dir)) as running:
        yield running


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(60_000)  # a loaded 2-core machine
    problems = []
    opened.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    opened.on("pageerror", lambda error: problems.append(str(error)))
    opened.console_errors = problems  # a test that provokes an HTTP error takes its own out
    yield opened
    context.close()
    assert not problems, f"the page logged errors: {problems}"


def api(server, path: str, headers: dict[str, str] | None = None) -> dict:
    request = urllib.request.Request(server.url + path, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def grid_paths(page) -> list[str]:
    return page.locator("#grid .card").evaluate_all("cards => cards.map(c => c.dataset.path)")


def wait_for_results(page, paths: list[str]) -> None:
    """Until the grid shows exactly `paths`, in order, with their thumbnails loaded."""
    page.wait_for_function("paths => JSON.stringify([...document.querySelectorAll('#grid .card')]"
                           ".map(c => c.dataset.path)) === JSON.stringify(paths)", arg=paths)
    page.wait_for_function("() => [...document.querySelectorAll('#grid .card img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")


def test_search_page_end_to_end(page, server, index_dir, tmp_path):
    photos = Path(json.loads((index_dir / "meta.json").read_text())["photo_root"])
    page.goto(server.url + "/")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('photos indexed')")

    # A text query: the grid shows what the API answers, best first, each with its score.
    page.fill("#q", "a red photo")
    page.press("#q", "Enter")
    expected = api(server, "/api/search?q=a%20red%20photo&k=24")["results"]
    wait_for_results(page, [h["path"] for h in expected])
    assert len(expected) == len(COLOURS)  # every servable photo (k=24 > 5), none of the links out
    badges = page.locator("#grid .card .score").all_text_contents()
    assert badges == [f"{h['score']:.3f}" for h in expected]
    assert "a red photo" in page.locator("#status").text_content()
    assert "q=a+red+photo" in page.url

    # "More like this" on a result: an image query by that photo, which comes first.
    page.locator('#grid .card[data-path="sub/blue.png"] .more').click()
    similar = api(server, "/api/similar?path=" + quote("sub/blue.png") + "&k=24")["results"]
    wait_for_results(page, [h["path"] for h in similar])
    assert grid_paths(page)[0] == "sub/blue.png" and grid_paths(page) != [h["path"] for h in expected]
    assert "photos like blue.png" in page.locator("#status").text_content()
    assert page.locator("#grid .card .score").first.text_content() == "1.000"

    # A photo from disk as the query, through the file input.
    page.set_input_files("#file", str(photos / "red.png"))
    wait_for_results(page, [h["path"] for h in api(server, "/api/similar?path=red.png&k=24")["results"]])
    assert "photos like red.png" in page.locator("#status").text_content()
    assert page.locator("#query-image").evaluate("img => img.naturalWidth") > 0

    # Drag and drop of a photo onto the page: the overlay shows while dragging, the drop searches.
    data = base64.b64encode((photos / "sub" / "green.jpg").read_bytes()).decode()
    page.evaluate("""({data, name}) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
        document.body.dispatchEvent(new DragEvent("dragenter", {dataTransfer: transfer, bubbles: true}));
        document.body.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true,
                                                               cancelable: true}));
        window.__overlayShown = !document.getElementById("drop").hidden;
        document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", {"data": data, "name": "green.jpg"})
    assert page.evaluate("window.__overlayShown") is True
    by_green = [h["path"] for h in api(server, "/api/similar?path=" + quote("sub/green.jpg") + "&k=24")["results"]]
    wait_for_results(page, by_green)
    assert page.locator("#drop").is_hidden()

    # The threshold slider hides what scores below it and says how many.
    scores = [float(s) for s in page.locator("#grid .card").evaluate_all("cs => cs.map(c => c.dataset.score)")]
    slider = page.locator("#threshold")
    step = float(slider.get_attribute("step"))
    minimum = float(slider.get_attribute("min"))
    second_best = sorted(scores, reverse=True)[1]
    value = minimum + step * int((second_best - minimum) / step)  # on the slider's grid, just under #2
    slider.fill(f"{value:.3f}")
    threshold = float(slider.input_value())
    hidden = sum(score < threshold for score in scores)
    assert 1 <= hidden <= len(scores) - 2, (scores, threshold)
    assert page.locator("#grid .card:visible").count() == len(scores) - hidden
    assert page.locator("#hidden-count").text_content() == f"{hidden} of {len(scores)} hidden"
    assert page.locator("#threshold-value").text_content() == f"{threshold:.3f}"

    # A thumbnail opens the photo; Escape closes it.
    page.locator("#grid .card .thumb").first.click()
    page.wait_for_function("() => { const img = document.getElementById('viewer-image');"
                           " return !document.getElementById('viewer').hidden && img.naturalWidth > 0; }")
    page.keyboard.press("Escape")
    assert page.locator("#viewer").is_hidden()

    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_an_error_is_shown_not_swallowed(page, server):
    page.goto(server.url + "/?q=" + quote("/etc/passwd"))
    page.wait_for_selector("#error:not([hidden])")
    assert "looks like a file path" in page.locator("#error").text_content()
    assert page.locator("#grid .card").count() == 0
    assert page.console_errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    page.console_errors.clear()


def test_the_page_with_a_token(browser, index_dir):
    from cliptune.deploy.serve import ServeOptions, ServerThread, create_app

    with ServerThread(create_app(index_dir, ServeOptions(token=TOKEN))) as server:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(server.url + f"/?token={TOKEN}&q=a+dog")
        expected = api(server, "/api/search?q=a%20dog&k=24", {"Authorization": f"Bearer {TOKEN}"})["results"]
        wait_for_results(page, [h["path"] for h in expected])
        assert TOKEN not in page.url  # moved out of the address bar (and the history)
        assert page.locator("#grid .card img").first.get_attribute("src").startswith("blob:")
        context.close()

        stranger = browser.new_context()
        page = stranger.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#token-box:not([hidden])")
        assert "missing token" in page.locator("#token-message").text_content()
        page.fill("#token", TOKEN)
        page.press("#token", "Enter")
        page.wait_for_function("() => document.getElementById('status').textContent.includes('photos indexed')")
        stranger.close()
