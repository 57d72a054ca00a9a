"""Screenshot of the dashboard on a run directory, for the README.

    python bench/screenshot_dashboard.py --run-dir runs/demo --out docs/dashboard.png [--tab Trends]

Starts the dashboard on a free loopback port, opens it in headless Chromium (Debian's
/usr/bin/chromium through Playwright; `apt-get install -y chromium`), waits for the page to render,
writes the PNG and stops the server. Offline: no request leaves 127.0.0.1.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboard import launch  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def wait_rendered(page, timeout_s: float = 40.0, expect: str | None = "RLHF rounds") -> None:
    """Until the app has stopped running its script and the charts have drawn."""
    if expect:
        page.get_by_text(expect, exact=False).first.wait_for(timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline:  # the status widget shows "Running..." while the script runs
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0
        quiet = 0 if running else quiet + 1
        if quiet >= 4:
            break
        page.wait_for_timeout(250)
    page.wait_for_timeout(800)  # plotly draws after the elements arrive


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).first.click()
    page.wait_for_timeout(600)


def capture(url: str, out: str | Path, tab: str | None = None, width: int = 1400, height: int = 1000,
            full_page: bool = True, chromium: str = CHROMIUM) -> dict:
    """Open `url`, optionally switch to `tab`, save a PNG; returns {"text", "external_requests"}."""
    from playwright.sync_api import sync_playwright

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    external: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dash-chromium-") as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
                                                   viewport={"width": width, "height": height})
        try:
            page = ctx.new_page()
            page.on("request", lambda r: external.append(r.url)
                    if not r.url.startswith(("http://127.0.0.1", "http://localhost", "ws://127.0.0.1", "data:", "blob:")) else None)
            page.goto(url, wait_until="domcontentloaded", timeout=30_000)
            wait_rendered(page)
            if tab:
                open_tab(page, tab)
                wait_rendered(page, expect=None)
            if full_page:  # Streamlit scrolls inside its main section, so grow the viewport to the content
                h = page.evaluate("() => Math.max(...[...document.querySelectorAll('[data-testid=stMain], section.main, body')]"
                                  ".map(e => e.scrollHeight))")
                page.set_viewport_size({"width": width, "height": int(min(max(h, height), 8000))})
                page.wait_for_timeout(800)
            page.screenshot(path=str(out), full_page=full_page)
            text = page.inner_text("body")
        finally:
            ctx.close()
    return {"text": text, "external_requests": external}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--out", default="docs/dashboard.png")
    ap.add_argument("--tab", default=None, help="Tab to show: Overview (default), 'Trends across rounds', 'Within a round', Samples, Lineage.")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--viewport-only", action="store_true", help="Only the visible viewport, not the full page.")
    ap.add_argument("--chromium", default=CHROMIUM)
    a = ap.parse_args(argv)
    if not Path(a.chromium).exists():
        print(f"error: {a.chromium} not found; install it with `apt-get install -y chromium`", file=sys.stderr)
        return 2
    port = launch.free_port()
    with tempfile.NamedTemporaryFile(prefix="dashboard-", suffix=".log", delete=False) as f:
        log = f.name
    proc = launch.start(a.run_dir, "127.0.0.1", port, log=log)
    t0 = time.time()
    try:
        if not launch.wait_ready("127.0.0.1", port, 45, proc):
            print(f"error: the dashboard did not start; log: {log}\n" + Path(log).read_text()[-2000:], file=sys.stderr)
            return 1
        res = capture(f"http://127.0.0.1:{port}/", a.out, a.tab, a.width, a.height, not a.viewport_only, a.chromium)
    finally:
        launch.stop(proc)
    if res["external_requests"]:
        print(f"warning: requests left loopback: {res['external_requests'][:5]}", file=sys.stderr)
    print(f"wrote {a.out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
