"""The console's first paint from a cold browser (issue 29's target: <= 300 ms on this machine).

    python bench/bench_console.py [--rounds 7]

Headless Debian Chromium through Playwright (as tests/browser), a fresh profile per load, against a
live server on the fake engines. Each round loads the console at `/` and, as the reference, a bare
page of the same server (the console's CSS file shown as text: one request, nothing to run), in
turn; the time is the page's first `paint` entry (from navigation start). Prints the medians and
the console's ratio to the bare page, with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Playwright, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.testing import fake_engines
from tests.browser.conftest import launch
from tests.live import live_server


def first_paint(playwright: Playwright, url: str) -> float:
    with tempfile.TemporaryDirectory() as profile:
        context = launch(playwright, Path(profile))
        try:
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("() => performance.getEntriesByType('paint').length >= 1")
            return float(page.evaluate("() => performance.getEntriesByType('paint')[0].startTime"))
        finally:
            context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    env = {"LIGHT_MODEL_PATH": "fake/gemma-3-270m", "LIGHT_N_CTX": "1024"}
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()}")
    with live_server(env, wait_for=("light",), engines=fake_engines()) as server, sync_playwright() as pw:
        pages = {"console /": server.url + "/", "bare page": server.url + "/static/console/console.css"}
        times: dict[str, list[float]] = {name: [] for name in pages}
        for _ in range(args.rounds):
            for name, url in pages.items():
                times[name].append(first_paint(pw, url))
    for name, values in times.items():
        print(f"{name:10s} first paint median {statistics.median(values):6.0f} ms  runs {[round(v) for v in values]}")
    ratio = statistics.median(times["console /"]) / statistics.median(times["bare page"])
    print(f"console / bare page: {ratio:.2f}x; load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
