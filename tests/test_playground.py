"""GET /playground: how it is served, and the page itself in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import aiohttp
import pytest
import structlog
from playwright.async_api import async_playwright, expect

from relay.edge.playground import CONTENT_SECURITY_POLICY
from relay.ops.config import load_config
from relay.state import STATE
from tests.browser import CHROMIUM, HELLO, launch
from tests.helpers import ALPHA_KEY, relay_config

ROOT = Path(__file__).parent.parent
PAGE_DIR = ROOT / "relay" / "edge" / "playground"


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


needs_chromium = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None and not os.environ.get("CI"),
    reason=f"needs Chromium at {CHROMIUM} (apt-get install chromium; Playwright may not "
    "download a browser here; .ci/run installs it, and in CI its absence fails the test)",
)


async def test_served_with_a_content_security_policy(local_relay, http):
    async with http.get(local_relay.make_url("/playground")) as page:
        assert page.status == 200 and page.content_type == "text/html"
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["Cache-Control"] == "no-store"
        assert 'src="/playground/playground.js"' in await page.text()
    for name, kind in [
        ("playground.js", "text/javascript"),
        ("capture-worklet.js", "text/javascript"),
        ("playground.css", "text/css"),
    ]:
        async with http.get(local_relay.make_url(f"/playground/{name}")) as response:
            assert response.status == 200 and response.content_type == kind
            assert "Content-Security-Policy" in response.headers
    async with http.get(local_relay.make_url("/playground/__init__.py")) as response:
        assert response.status == 404


async def test_off_by_default(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    async with http.get(relay.make_url("/playground")) as page:
        assert page.status == 404


def test_the_page_keeps_the_key_out_of_storage():
    script = (PAGE_DIR / "playground.js").read_text()
    for storage in ("localStorage", "sessionStorage", "document.cookie", "indexedDB", "history."):
        assert storage not in script


async def test_the_pages_own_origin_may_connect_whatever_the_list(simulator, start_relay, http):
    allowed = {"allowed_origins": ["https://app.example.com"]}
    relay = await start_relay(
        relay_config(simulator.url, server=allowed, playground={"enabled": True})
    )
    url = relay.make_url("/openai/v1/realtime?model=gpt-realtime")
    headers = {"api-key": ALPHA_KEY}
    own = f"http://127.0.0.1:{relay.port}"
    async with http.ws_connect(url, headers=headers, origin=own) as ws:
        assert (await ws.receive_json())["type"] == "session.created"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url, headers=headers, origin="https://elsewhere.example.com")
    assert refused.value.status == 403
    # Without the playground, the relay's own origin is just another origin.
    relay = await start_relay(relay_config(simulator.url, server=allowed))
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.ws_connect(
            relay.make_url("/openai/v1/realtime?model=gpt-realtime"),
            headers=headers,
            origin=f"http://127.0.0.1:{relay.port}",
        )


@pytest.mark.parametrize(
    ("query", "key", "status", "code"),
    [
        ("model=gpt-realtime", "rk-wrong", 401, "invalid_api_key"),
        ("model=nope", ALPHA_KEY, 404, "deployment_not_found"),
    ],
)
async def test_browser_clients_get_refusals_as_an_error_event(
    simulator, start_relay, http, query, key, status, code
):
    """A browser cannot read a refused handshake: offering `realtime` gets the refusal in band."""
    relay = await start_relay(relay_config(simulator.url))
    url = relay.make_url(f"/openai/v1/realtime?{query}")
    protocols = ("realtime", f"openai-insecure-api-key.{key}")
    with structlog.testing.capture_logs() as logs:
        async with http.ws_connect(url, protocols=protocols) as ws:
            assert ws.protocol == "realtime"
            event = await ws.receive_json()
            closing = await ws.receive()
    assert any(e["event"] == "session_refused" and e["code"] == code for e in logs)
    assert key not in repr(logs)
    assert event["type"] == "error"
    assert event["error"]["code"] == code and event["error"]["type"] == "invalid_request_error"
    assert closing.type == aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 4000 + status
    assert closing.extra == code
    # Clients that do not offer the subprotocol still get the HTTP status and JSON body.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url, headers={"api-key": key})
    assert refused.value.status == status


# --- the page in headless Chromium -----------------------------------------------------


@pytest.fixture
async def browser():
    async with async_playwright() as playwright:
        chromium = await launch(playwright, microphone=HELLO)
        yield chromium
        await chromium.close()


async def open_playground(browser, relay, key="rk-local-demo", clock=False):
    page = await browser.new_page()
    if clock:
        await page.clock.install()  # the page's own clock, at real pace until moved
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    await page.goto(str(relay.make_url("/playground")))
    await page.fill("#key", key)
    await page.click("#connect")
    return page, problems


async def wait_for_reply(page) -> None:
    await page.wait_for_selector("#transcript li.assistant", timeout=30_000)
    # Audio chunks played through WebAudio, not only received. (Selectors, not
    # wait_for_function: the page's CSP forbids the eval that needs.)
    await page.wait_for_selector("#counters:not([data-played='0'])", timeout=30_000)


@needs_chromium
async def test_the_microphone_gets_a_spoken_reply(browser, local_relay):
    page, problems = await open_playground(browser, local_relay)
    await page.wait_for_selector("#status[data-state=connected]")
    await page.click("#mic")  # the fake microphone plays examples/hello.wav
    await wait_for_reply(page)
    # The fake microphone loops the file: more turns may follow the first.
    await expect(page.locator("#transcript li.assistant").first).to_contain_text(
        "You said: Hello, this is"
    )
    assert await page.locator("#transcript li.user").count() >= 1
    log = await page.inner_text("#log")
    assert "→ input_audio_buffer.append" in log and "← response.output_audio.delta" in log
    # The key stayed in memory.
    stored = await page.evaluate(
        "localStorage.length + sessionStorage.length + document.cookie.length"
    )
    assert stored == 0
    assert problems == []


@needs_chromium
async def test_send_a_wav_file(browser, local_relay):
    page, problems = await open_playground(browser, local_relay)
    await page.wait_for_selector("#status[data-state=connected]")
    await page.set_input_files("#wav", HELLO)
    await wait_for_reply(page)
    await expect(page.locator("#transcript li.assistant")).to_have_text(
        "You said: Hello, this is 3.0 seconds of simulated speech."
    )
    # The plot got the response's time to first audio, and probe round trips.
    await page.wait_for_selector("#plot:not([data-ttfa='0'])")
    await page.wait_for_selector("#plot:not([data-rtt='0'])")
    assert problems == []


@needs_chromium
async def test_a_wrong_key_shows_the_relays_error(browser, local_relay):
    page, _ = await open_playground(browser, local_relay, key="rk-wrong")
    await page.wait_for_selector("#status[data-state=error]")
    await expect(page.locator("#error")).to_have_text(
        "invalid_api_key: The relay key is not valid."
    )
    await expect(page.locator("#status")).to_have_text("refused (4401 invalid_api_key)")


@needs_chromium
async def test_a_relay_that_is_gone_is_named_as_such(browser, local_relay):
    page = await browser.new_page()
    await page.goto(str(local_relay.make_url("/playground")))
    await local_relay.close()
    await page.fill("#key", "rk-local-demo")
    await page.click("#connect")
    await page.wait_for_selector("#status[data-state=error]")
    await expect(page.locator("#status")).to_have_text("could not connect")
    await expect(page.locator("#error")).to_contain_text("is it running")


@needs_chromium
async def test_double_clicks_open_one_session_and_one_microphone(browser, local_relay):
    """Two clicks on Connect opened two sessions (the page could close only the second);
    two on "Start microphone" started two captures, and Stop stopped only one: the page
    kept sending the microphone after the user said stop."""
    page = await browser.new_page()
    await page.goto(str(local_relay.make_url("/playground")))
    await page.fill("#key", "rk-local-demo")
    await page.dblclick("#connect")
    await page.wait_for_selector("#status[data-state=connected]")
    assert len(local_relay.app[STATE].bridges) == 1
    await page.dblclick("#mic")
    await expect(page.locator("#mic")).to_have_text("Stop microphone")
    await page.click("#mic")
    await expect(page.locator("#mic")).to_have_text("Start microphone")
    sent = await page.get_attribute("#counters", "data-sent")
    # Stopped: no append goes out any more (a capture runs at 25 chunks a second).
    await page.wait_for_timeout(400)  # four chunks' worth, had a capture stayed on
    assert await page.get_attribute("#counters", "data-sent") == sent


@needs_chromium
async def test_a_key_a_browser_cannot_send_is_named_without_showing_it(browser, local_relay):
    page, _ = await open_playground(browser, local_relay, key="Bearer rk-local-demo")
    await page.wait_for_selector("#status[data-state=error]")
    error = await page.inner_text("#error")
    assert "cannot send" in error and "rk-local-demo" not in error


@needs_chromium
async def test_a_forgotten_page_stops_probing_and_meets_the_idle_timeout(
    browser, start_relay, tmp_path
):
    """The page's round-trip probes are client events: a tab left open kept its session
    (and the team's slot) to max_session_seconds. Five minutes unused, they stop."""
    local = (ROOT / "config" / "local.toml").read_text()
    assert "idle_timeout_seconds = 300" in local
    config_path = tmp_path / "local.toml"
    config_path.write_text(local.replace("idle_timeout_seconds = 300", "idle_timeout_seconds = 3"))
    config = load_config(config_path, {"RELAY_SIMULATOR__SPEED": "0"})
    relay = await start_relay(config, environ={"RELAY_SIMULATOR_KEY": "local-simulator-key"})
    page, _ = await open_playground(browser, relay, clock=True)
    await page.wait_for_selector("#status[data-state=connected]")
    await page.wait_for_selector("#plot:not([data-rtt='0'])")  # probing (every 2 s)
    await page.clock.fast_forward("05:01")  # the page left unused for five minutes
    # Probing, the page kept the session from its 3-second idle timeout.
    await expect(page.locator("#status")).to_have_text("closed (1008 idle timeout)")


@needs_chromium
async def test_a_relay_that_stops_answering_or_drops_the_connection_is_flagged(
    browser, local_relay
):
    page, _ = await open_playground(browser, local_relay, clock=True)
    await page.wait_for_selector("#status[data-state=connected]")
    (bridge,) = local_relay.app[STATE].bridges
    bridge.client_transport.pause_reading()  # frozen: the page's probes go unanswered
    await page.clock.fast_forward(2_000)  # a probe goes out
    await page.clock.fast_forward(12_000)  # the next finds it unanswered
    await expect(page.locator("#status")).to_have_text(re.compile(r"no answer for \d+ s"))
    bridge.client_transport.resume_reading()
    await page.clock.fast_forward(2_000)
    await expect(page.locator("#status")).to_have_text("connected")
    bridge.client_transport.abort()  # gone without a close
    await expect(page.locator("#status")).to_have_text("closed (1006)")
    await expect(page.locator("#error")).to_contain_text("lost without a close")
