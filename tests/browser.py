"""Headless Chromium for the playground tests: Debian's /usr/bin/chromium driven by Playwright
(never `playwright install`: no browser is downloaded). The fake microphone plays a WAV file.

`python -m tests.browser URL OUT.png` screenshots the playground at URL after talking to it
with the demo key (how docs/playground.png is made; `make run` must be serving).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM", "/usr/bin/chromium")
HELLO = Path(__file__).parent.parent / "examples" / "hello.wav"


def chromium_args(microphone: Path) -> list[str]:
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ]  # fmt: skip


async def launch(playwright: Any, microphone: Path = HELLO) -> Any:
    return await playwright.chromium.launch(
        executable_path=CHROMIUM, args=chromium_args(microphone)
    )


async def talk_and_screenshot(url: str, out: Path) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await launch(playwright)
        page = await browser.new_page(viewport={"width": 1200, "height": 860})
        await page.goto(url)
        await page.fill("#key", "rk-local-demo")
        await page.click("#connect")
        await page.wait_for_selector("#status[data-state=connected]")
        await page.set_input_files("#wav", HELLO)
        await page.wait_for_selector("#transcript li.assistant", timeout=30_000)
        await page.wait_for_selector("#counters:not([data-played='0'])")
        await page.wait_for_timeout(6000)  # let the reply play out and a few probes plot
        await page.screenshot(path=str(out))
        await browser.close()


if __name__ == "__main__":
    asyncio.run(talk_and_screenshot(sys.argv[1], Path(sys.argv[2])))
