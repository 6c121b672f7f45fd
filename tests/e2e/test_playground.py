"""The playground page in a real browser: Debian's headless Chromium driven by Playwright (PyPI), against
the e2e tier's real gateway and role workers (tiny FLUX for images, tiny Wan for video), inside the
tier's empty network namespace — so the page provably loads nothing from outside the gateway.

What a person would check by looking, checked by the browser: the image appears at the requested pixel
size with the seed used and a stage bar of the three stages and both hand-overs; a 7x7 size shows the
gateway's 400 message next to the size field; a video job shows its progress, then a `<video>` that
decodes; a gateway that requires an API key says so next to the key field and works once it is typed.
Screenshots of each state go to $DIFFDISAGG_SCREENSHOT_DIR (default: bench/out/playground/, git-ignored);
docs/img/ holds copies of the final ones for the README.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright

from diffdisagg.worker.launcher import LocalDeployment

S = sys.modules["diffdisagg_e2e_support"]  # loaded by conftest.py

CHROMIUM = "/usr/bin/chromium"
# As root and in a closed network: no sandbox (needs user namespaces Chromium cannot get here), no GPU,
# and none of Chromium's own background connections (they would only be refused).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 90_000
expect.set_options(timeout=TIMEOUT_MS)  # a generation on 2 shared cores can take longer than 5 s
SHOTS = Path(
    os.environ.get("DIFFDISAGG_SCREENSHOT_DIR")
    or Path(__file__).resolve().parents[2] / "bench" / "out" / "playground"
)


@pytest.fixture(scope="module")
def browser(empty_network_namespace: None) -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: run scripts/browser-deps.sh"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class _Watch:
    """Every request the page makes and every console error, so a test can say the page stayed local."""

    def __init__(self, page: Page, origin: str) -> None:
        self.origin = origin
        self.urls: list[str] = []
        self.errors: list[str] = []
        page.on("request", self._request)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _request(self, req: Request) -> None:
        self.urls.append(req.url)

    def _console(self, msg: ConsoleMessage) -> None:
        # A 4xx answer the page shows on purpose logs "Failed to load resource": that is not a page error.
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            self.errors.append(msg.text)

    def assert_local(self) -> None:
        foreign = [
            u for u in self.urls if not (u.startswith(self.origin) or u.startswith(("data:", "blob:")))
        ]
        assert not foreign, f"the page fetched from elsewhere: {foreign}"
        assert not self.errors, self.errors


def _open(browser: Browser, url: str) -> tuple[Page, _Watch]:
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    watch = _Watch(page, url)
    page.goto(url + "/")
    return page, watch


def _shot(page: Page, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_page_is_served_from_the_package(flux: LocalDeployment) -> None:
    for path in ("/", "/playground"):
        with urllib.request.urlopen(flux.url + path, timeout=10) as resp:
            html = resp.read().decode()
            assert resp.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in resp.headers["content-security-policy"]
        assert "/playground/static/playground.js" in html
        assert "http://" not in html and "https://" not in html  # nothing to fetch from elsewhere
    status, body = S.http_json("GET", flux.url + "/playground/static/..%2Fapp.py")
    assert status == 404, body


def test_image_with_stage_bar(browser: Browser, flux: LocalDeployment) -> None:
    page, watch = _open(browser, flux.url)
    expect(page.locator("#model option")).to_have_count(1)
    assert page.locator("#model").input_value() == "diffdisagg-tiny-flux"
    page.fill("#prompt", "a red fox in the snow")
    page.fill("#size", "96x64")
    page.fill("#steps", "2")
    page.fill("#seed", "1234")
    _shot(page, "01-form")
    page.click("#generate")
    img = page.locator("#result-image")
    expect(img).to_be_visible()
    natural = img.evaluate("i => [i.naturalWidth, i.naturalHeight, i.complete]")
    assert natural == [96, 64, True], natural
    expect(page.locator("#seed-used")).to_have_text("1234")
    expect(page.locator("#size-used")).to_have_text("96x64")
    segs = page.locator("#stage-bar .seg").evaluate_all(
        "els => els.map(e => ({...e.dataset, width: e.getBoundingClientRect().width}))"
    )
    compute = {s["role"]: float(s["ms"]) for s in segs if s["kind"] == "compute"}
    assert set(compute) == {"prefill", "denoise", "decode"}, segs
    assert all(ms > 0 for ms in compute.values()), compute
    # the slow denoise pool (--stage-delay) makes denoise the widest bar
    widths = {s["role"]: s["width"] for s in segs if s["kind"] == "compute"}
    assert widths["denoise"] > widths["prefill"] and widths["denoise"] > widths["decode"], widths
    hand = [(s["from"], s["to"], int(s["bytes"]), float(s["ms"])) for s in segs if s["kind"] == "handover"]
    assert [(a, b) for a, b, _, _ in hand] == [("prefill", "denoise"), ("denoise", "decode")], segs
    assert all(nbytes > 0 and ms > 0 for _, _, nbytes, ms in hand), hand
    assert page.locator("#stage-table tbody tr").count() == len(segs)
    total = float(page.locator("#total-ms").inner_text().split()[0])
    assert total >= sum(compute.values()) * 0.9, (total, compute)
    _shot(page, "02-image-result")
    watch.assert_local()
    page.close()


def test_timings_extension_in_the_api(flux: LocalDeployment) -> None:
    """What the bar draws is in the response for scripts too, and the openai client ignores it."""
    from openai import OpenAI

    status, body = S.http_json(
        "POST",
        flux.url + "/v1/images/generations",
        {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "seed": 5},
    )
    assert status == 200, body
    ext = body["diffdisagg"]
    assert ext["seeds"] == [5]
    t = ext["timings"][0]
    kinds = [(s["kind"], s.get("role") or s.get("to")) for s in t["segments"]]
    assert kinds[:2] == [("queue", "prefill"), ("compute", "prefill")], kinds
    assert ("handover", "denoise") in kinds and ("handover", "decode") in kinds, kinds
    assert kinds[-1] == ("other", None), kinds
    # the segments partition the gateway's end-to-end time (clamping a negative remainder aside)
    assert abs(sum(s["ms"] for s in t["segments"]) - t["total_ms"]) <= max(1.0, 0.05 * t["total_ms"]), t
    assert all(s["ms"] >= 0 for s in t["segments"]), t
    for s in t["segments"]:  # the workers' own StageTiming details, where they send them, are consistent
        if "write_ms" in s:
            assert 0 <= s["write_ms"] <= s["ms"] + 0.01, s
        if "attempts" in s:
            assert s["attempts"] >= 1, s
        if "batch_size" in s:
            assert s["batch_size"] >= 1, s
    client = OpenAI(base_url=flux.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    img = client.images.generate(prompt="a lighthouse", size="64x64", extra_body={"seed": 5})
    assert base64.b64decode(img.data[0].b64_json)[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(img.model_dump_json())["diffdisagg"]["seeds"] == [5]  # kept as an extra, not an error


def test_bad_size_shows_the_gateway_message_at_the_field(browser: Browser, flux: LocalDeployment) -> None:
    page, watch = _open(browser, flux.url)
    expect(page.locator("#model option")).to_have_count(1)
    page.fill("#prompt", "a red fox in the snow")
    page.fill("#size", "7x7")
    page.click("#generate")
    err = page.locator("#err-size")
    expect(err).to_be_visible()
    text = err.inner_text()
    assert text.startswith("400: ") and "'size'" in text and "7x7" in text, text
    assert page.locator("#size").evaluate("e => e.classList.contains('invalid')")
    assert page.locator("#err-general").inner_text() == ""
    expect(page.locator("#generate")).to_be_enabled()  # the page is still usable
    _shot(page, "03-bad-size")
    watch.assert_local()
    page.close()


def test_video_progress_then_playable(browser: Browser, wan: LocalDeployment) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    watch = _Watch(page, wan.url)
    # Record every progress line the page shows (they change faster than a test could poll them).
    page.add_init_script(
        """
        window.__progress = [];
        document.addEventListener('DOMContentLoaded', () => {
          const el = document.getElementById('progress-text');
          new MutationObserver(() => window.__progress.push(el.textContent))
            .observe(el, {childList: true, characterData: true, subtree: true});
        });
        """
    )
    page.goto(wan.url + "/")
    expect(page.locator("#model option")).to_have_count(1)
    assert page.locator('input[name="mode"][value="video"]').is_checked()  # a video model preselects video
    page.fill("#prompt", "waves on a beach")
    page.fill("#size", "64x64")
    page.fill("#steps", "2")
    page.fill("#num_frames", "5")
    page.fill("#seed", "3")
    page.click("#generate")
    expect(page.locator("#progress-wrap")).to_be_visible()
    _shot(page, "04-video-progress")
    video = page.locator("#result-video")
    expect(video).to_be_attached()
    state = video.evaluate(
        """v => new Promise((resolve, reject) => {
             const done = () => resolve({ready: v.readyState, duration: v.duration,
                                         w: v.videoWidth, h: v.videoHeight, error: v.error && v.error.code});
             if (v.readyState >= 2) return done();
             v.addEventListener('loadeddata', done, {once: true});
             v.addEventListener('error', () => reject(new Error('video error ' + (v.error && v.error.code))),
                                {once: true});
           })"""
    )
    assert state["ready"] >= 2 and state["duration"] > 0, state
    assert (state["w"], state["h"]) == (64, 64), state
    progress = page.evaluate("window.__progress")
    assert any(p.startswith(("queued", "in_progress")) for p in progress), progress
    assert progress[-1] == "completed 100%", progress
    expect(page.locator("#seed-used")).to_have_text("3")
    roles = page.locator("#stage-bar .seg[data-kind=compute]").evaluate_all(
        "els => els.map(e => [e.dataset.role, parseFloat(e.dataset.ms)])"
    )
    assert [r for r, _ in roles] == ["prefill", "denoise", "decode"] and all(ms > 0 for _, ms in roles)
    # it plays: the playback position moves (muted, so the browser allows it without a gesture)
    played = video.evaluate(
        """async v => {
             await v.play();
             const t0 = performance.now();
             while (v.currentTime === 0 && performance.now() - t0 < 10000) {
               await new Promise(r => setTimeout(r, 50));
             }
             v.pause();
             return v.currentTime;
           }"""
    )
    assert played > 0, played
    _shot(page, "05-video-result")
    watch.assert_local()
    page.close()


def test_api_key_asked_and_kept_in_the_browser(browser: Browser, tmp_path: Path) -> None:
    key = "pg-test-key-123"
    # Only the gateway: enough to prove the key path (and that a 503 'no workers' is shown, not a blank page).
    gw = LocalDeployment(family="flux", counts={"prefill": 0, "denoise": 0, "decode": 0}, api_key=key)
    gw.workdir = tmp_path / "gw"
    gw.start()
    try:
        S.wait_for(lambda: _up(gw), timeout=60, message="gateway up")
        page, watch = _open(browser, gw.url)
        err = page.locator("#err-api_key")
        expect(err).to_contain_text("401")
        assert page.locator("#model option").count() == 0
        page.fill("#api-key", key)
        page.click("#save-key")
        expect(page.locator("#model option")).to_have_count(1)
        expect(err).to_have_text("")
        stored = page.evaluate(
            "[sessionStorage.getItem('diffdisagg.apiKey'), localStorage.getItem('diffdisagg.apiKey')]"
        )
        assert stored == [key, None], stored
        page.fill("#prompt", "a red fox")
        page.click("#generate")
        general = page.locator("#err-general")
        expect(general).to_contain_text("503")
        expect(general).to_contain_text("no live worker")
        watch.assert_local()
        page.close()
    finally:
        gw.stop()


def _up(d: LocalDeployment) -> bool:
    try:
        with urllib.request.urlopen(d.url + "/health", timeout=2):
            return True
    except OSError:
        return False
