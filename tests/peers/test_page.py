"""The swarm page (GET /) in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium; scripts/install puts them in): it shows the right peers and spans, a peer
killed mid-test turns dead on it without a reload, and a screenshot is written as an artefact
(artifacts/swarm-page.png). Plus what /view gives strangers: numbers only from other peers'
/health, and nothing at all off loopback in a private swarm."""

import asyncio
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.peers.processes import Swarm, wait_until

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
GOSSIP = ["--gossip-interval", "0.5", "--suspect-after", "2", "--dead-after", "4"]


def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    found = chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(
                "chromium and chromedriver are missing: scripts/install puts them in (apt-get, as root)"
            )
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


SNAPSHOT = """
const text = (sel) => Array.from(document.querySelectorAll(sel)).map((e) => e.textContent);
return {
  rows: Object.fromEntries(Array.from(document.querySelectorAll("#peers tbody tr[data-peer]")).map(
    (r) => [r.dataset.peer, [r.children[2].textContent, r.children[3].textContent]])),
  map: Object.fromEntries(Array.from(document.querySelectorAll("#map tr[data-peer]")).map(
    (r) => [r.dataset.peer, [r.querySelectorAll("td.on").length, r.className]])),
  replicas: text("#replicas td"),
  summary: document.getElementById("summary").textContent,
};
"""


def page(driver) -> dict:
    """What the page shows now, read in one go (it redraws every second)."""
    return driver.execute_script(SNAPSHOT)


def rows(driver) -> dict[str, tuple[str, str]]:
    """peer id -> (layers, status), as the page's peers table shows them now."""
    return {peer: tuple(cells) for peer, cells in page(driver)["rows"].items()}


def test_the_page_shows_the_swarm_and_a_killed_peer_turns_dead(browser, tiny_llama, tmp_path):
    s = Swarm(tiny_llama, tmp_path, GOSSIP)
    try:
        entry, a, b = s.add("0:2"), s.add("2:4"), s.add("2:4")
        s.wait_ready()
        s.wait_route(entry)
        browser.get(entry.url + "/")
        spans = {entry.peer_id: "0:2", a.peer_id: "2:4", b.peer_id: "2:4"}
        expected = {pid: (layers, "serving") for pid, layers in spans.items()}

        def complete() -> bool:  # (a peer shows as serving before this peer has vouched for it and
            shown = page(browser)  # routes to it: only then does it count as a replica)
            return rows(browser) == expected and shown["replicas"] == ["1", "1", "2", "2"]

        wait_until(complete, 30, lambda: f"the page shows {page(browser)}")
        shown = page(browser)
        assert {p: on for p, (on, _) in shown["map"].items()} == {
            entry.peer_id: 2,
            a.peer_id: 2,
            b.peer_id: 2,
        }
        assert "every layer is served" in shown["summary"], shown

        # a generation, so that the entry's tokens/s has something to show
        body = {"model": "llama", "prompt": "hello", "max_tokens": 16, "temperature": 0}
        assert httpx.post(f"{entry.url}/v1/completions", json=body, timeout=60).status_code == 200

        b.kill()  # the page is not reloaded: it must redraw by itself
        wait_until(
            lambda: rows(browser).get(b.peer_id, ("", ""))[1] == "dead",
            60,
            lambda: f"the page shows {rows(browser)}",
        )
        assert rows(browser)[a.peer_id] == ("2:4", "serving")
        assert "dead" in page(browser)["map"][b.peer_id][1]  # its row of the map is drawn dead
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "swarm-page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        print(f"screenshot: {shot}")
    finally:
        s.stop()


def test_other_peers_health_reaches_the_page_as_numbers_only():
    """A peer's /health is a stranger's answer: a script in it must never reach the page."""
    from peers.view import View

    hostile = {
        "sessions": "<img src=x onerror=alert(1)>",
        "steps_served": 12,
        "tokens_generated": True,
        "scheduler": {"mean_queue_wait_ms": "<script>alert(1)</script>"},
        "hop_path_ms": {"compute": 3.5},
    }
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, json=hostile)))

    async def ask():
        try:
            return await View(None, http, "llama", 4, [])._health("127.0.0.1:9")
        finally:
            await http.aclose()

    assert asyncio.run(ask()) == {"steps_served": 12, "compute_ms": 3.5}


def test_a_private_swarms_view_answers_loopback_only(tiny_llama):
    """Its table is not for strangers (/swarm/table needs the key): nor is its page's data."""
    from peers.server import create_app
    from tests.peers.test_inprocess import start_swarm, stop_swarm

    async def main():
        _, (node,) = await start_swarm(tiny_llama, ["0:4"], swarm_key=b"k" * 32)
        app = create_app(node)
        try:
            answers = {}
            for client in ("127.0.0.1", "10.0.0.5"):
                transport = httpx.ASGITransport(app=app, client=(client, 50000))
                async with httpx.AsyncClient(transport=transport, base_url="http://peer") as http:
                    answers[client] = (
                        (await http.get("/view")).status_code,
                        (await http.get("/")).status_code,
                    )
            return answers
        finally:
            await stop_swarm([node])

    answers = asyncio.run(main())
    assert answers == {"127.0.0.1": (200, 200), "10.0.0.5": (403, 200)}  # the page itself holds no data
