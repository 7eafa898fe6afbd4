"""A screenshot of `cliptune serve`'s page after a query, as docs/images/serve.png shows it.

Serves INDEX on a free loopback port (in this process), opens the page in Debian's headless
chromium through Playwright, searches, waits for every thumbnail, and saves the viewport as a PNG
reduced to a palette of at most 256 colours, fewer until it fits --max-kb (a photo grid at full
colour is about 1 MB).

    python scripts/serve_screenshot.py INDEX --query "a dog on a couch" --out docs/images/serve.png
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from urllib.parse import quote

from PIL import Image

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index", type=Path)
    parser.add_argument("--query", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--k", type=int, default=24)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=860)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--max-kb", type=int, default=295, help="largest PNG to write (fewer colours until it fits)")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from cliptune.deploy.serve import ServerThread, create_app

    with ServerThread(create_app(args.index)) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.set_default_timeout(120_000)
        page.goto(f"{server.url}/?q={quote(args.query)}")
        page.wait_for_selector("#grid .card")
        page.wait_for_function("() => [...document.querySelectorAll('#grid .card img')]"
                               ".every(img => img.complete && img.naturalWidth > 0)")
        page.mouse.move(0, args.height - 1)  # no hover effect in the picture
        shot = Image.open(io.BytesIO(page.screenshot()))
        browser.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for colours in (256, 224, 192, 160, 128, 96, 64):  # the most that fit in --max-kb
        data = io.BytesIO()
        shot.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, kmeans=1,
                                     dither=Image.Dither.FLOYDSTEINBERG).save(data, "PNG", optimize=True)
        if data.tell() <= args.max_kb * 1000:
            break
    args.out.write_bytes(data.getvalue())
    print(f"{args.out}: {data.tell() / 1000:.0f} KB, {shot.width}x{shot.height}, {colours} colours")


if __name__ == "__main__":
    main()
