"""Headless Chromium screenshots of the pages `scripts/screenshots.py` names (run in
`.venv-docs`, which holds Playwright; Debian's Chromium, never a downloaded browser).

Reads a JSON spec on stdin: ``pages`` (name -> [URL, the text to scroll to or null]), ``dagster`` (the webserver, whose
first-visit popup is dismissed through its GraphQL API), ``label_studio`` (URL and the admin's
credentials, to log in) and ``out`` (the folder the PNGs go to).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def dismiss_dagster_popup(dagster: str) -> None:
    request = urllib.request.Request(
        f"{dagster}/graphql",
        data=json.dumps({"query": "mutation { setNuxSeen }"}).encode(),
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30).read()


def main() -> int:
    spec = json.load(sys.stdin)
    out = Path(spec["out"])
    dismiss_dagster_popup(spec["dagster"])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 950})
        ls = spec["label_studio"]
        page.goto(f"{ls['url']}/user/login", wait_until="networkidle")
        page.fill("input[name=email]", ls["username"])
        page.fill("input[name=password]", ls["password"])
        page.click("button[type=submit], input[type=submit]")
        page.wait_for_load_state("networkidle")
        for name, (url, focus) in spec["pages"].items():
            page.goto(url, wait_until="networkidle", timeout=120_000)
            page.wait_for_timeout(4000)  # the graph's layout, the metadata's images
            if focus:
                # The metadata scrolls inside its pane: bring the row to the top of the view.
                row = page.get_by_text(focus, exact=True).first
                row.evaluate("e => e.scrollIntoView({block: 'start'})")
                page.wait_for_timeout(1500)
                # A long Markdown value (the loss curve's picture) opens in a dialog.
                more = page.locator("tr", has=row).get_by_text("[Show Markdown]")
                if more.count():
                    more.first.click()
                    page.wait_for_timeout(2500)
            page.screenshot(path=str(out / f"{name}.png"))
            print(f"{name}: {out / f'{name}.png'}", flush=True)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
