"""Screenshot of `capsnet explore` for the README: a trained checkpoint, one test image loaded.

    python scripts/screenshot_explore.py CHECKPOINT docs/explore.png [--data-dir DIR]

Needs playwright and Debian's chromium (installed by `scripts/setup.sh test`).
"""

from __future__ import annotations

import argparse
import threading

from playwright.sync_api import sync_playwright

from capsnet.tools.explore import make_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--data-dir")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    server = make_server(args.checkpoint, "127.0.0.1", 0, data_dir=args.data_dir)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium)
            page = browser.new_page(viewport={"width": 1180, "height": 800})
            page.goto(server.url)
            page.click("#sample")
            page.wait_for_function("document.querySelector('#prediction').textContent !== '–'")
            page.wait_for_timeout(500)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
