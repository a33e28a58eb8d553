"""End to end in a real browser: the demo page at / on a real `vae serve`, in headless Chromium.

Playwright drives the system's Chromium (Debian's `chromium` package, which .ci/run installs),
never a browser Playwright downloads. The page must work offline: any request that leaves the
server's origin fails the test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import LiveServerFactory
from tests.e2e import test_server as e2e

CHROMIUM = Path(os.environ.get("VAE_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000

# The server fixtures of test_server.py: a real `vae serve` on a free loopback port, serving the
# default bundle (service/bundles/mnist) when present, else the tiny one; and real MNIST digits.
server = e2e.server
digits = e2e.digits


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A persistent Chromium context on a fresh user-data-dir."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (as .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


class Page:
    """A page on `origin` that records console errors and requests leaving the origin."""

    def __init__(self, browser: Any, origin: str, path: str = "/") -> None:
        self.page = browser.new_page()
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

        def guard(route: Any) -> None:
            url = route.request.url
            if url.startswith((origin, "data:", "blob:")):
                route.continue_()
            else:
                self.foreign.append(url)
                route.abort()

        self.page.route("**/*", guard)
        self.page.goto(f"{origin}{path}")


@pytest.fixture
def page(browser: Any, server: httpx.Client) -> Iterator[Page]:
    page = Page(browser, str(server.base_url).rstrip("/"))
    yield page
    page.page.close()
    assert page.foreign == [], "the page fetched from outside the server"


def loaded(page: Any, selector: str) -> None:
    """Wait until every image matching `selector` has loaded with a non-zero size."""
    page.wait_for_function(
        """(selector) => {
            const images = [...document.querySelectorAll(selector)];
            return images.length > 0 && images.every((i) => i.complete && i.naturalWidth > 0);
        }""",
        arg=selector,
    )


BROKEN_IMAGES = """() => [...document.images]
    .filter((i) => getComputedStyle(i).display !== "none" && i.offsetParent !== null)
    .filter((i) => !(i.complete && i.naturalWidth > 0))
    .map((i) => i.id)"""


def test_the_demo_page(
    page: Page, digits: np.ndarray, bundle: Path, tmp_path: Path, server: httpx.Client
) -> None:
    p = page.page
    assert p.title() == "VAE server demo"
    manifest = server.get("/model").json()
    # locators, not string predicates: those are eval'd in the page, which its CSP forbids
    p.locator("#model-info", has_text="latent").wait_for()
    assert manifest["name"] in p.text_content("#model-info")
    # nothing shown before it exists: no broken-image bar under "Sample from the prior"
    assert p.evaluate(BROKEN_IMAGES) == []
    assert not p.locator("#sample-grid").is_visible()

    # score: an uploaded digit shows its reconstruction, ELBO, percentile and verdict
    digit = tmp_path / "digit.png"
    digit.write_bytes(e2e.png(digits[0]))
    p.set_input_files("#score-file", digit)
    p.wait_for_selector("#score-result:not([hidden])")
    p.locator("#score-verdict", has_text=re.compile("Normal|Anomaly|No threshold")).wait_for()
    elbo = float(p.text_content("#score-elbo") or "")
    expected = server.post("/elbo", files=[("images", ("d.png", digit.read_bytes()))]).json()
    assert elbo == pytest.approx(expected["results"][0]["elbo"], abs=0.01)
    assert p.text_content("#score-verdict") in ("Normal", "Anomaly")
    float(p.text_content("#score-percentile") or "")
    if bundle == e2e.DEFAULT_BUNDLE:  # the tiny bundle knows strokes, not digits
        assert p.text_content("#score-verdict") == "Normal"
    loaded(p, "#score-input, #score-reconstruction, #score-map")
    # the input as the model saw it: converted and resized to the model's size, not the upload
    width, height = manifest["image"]["width"], manifest["image"]["height"]
    assert p.evaluate("document.getElementById('score-input').naturalWidth") == width
    assert p.evaluate("document.getElementById('score-input').naturalHeight") == height
    assert f"({width}×{height})" in (p.text_content("#score-input-caption") or "")
    assert p.evaluate("document.getElementById('score-map').naturalWidth") == width

    # sample: a PNG grid for the seed and temperature asked for
    p.fill("#sample-seed", "7")
    p.fill("#sample-temperature", "0.8")
    p.click("#sample-button")
    loaded(p, "#sample-grid")
    assert p.evaluate("document.getElementById('sample-grid').naturalWidth") == 4 * 30 + 2
    assert "seed 7" in (p.text_content("#sample-status") or "")

    # interpolate: two digits, eight decoded steps between them
    other = tmp_path / "other.png"
    other.write_bytes(e2e.png(digits[1]))
    p.set_input_files("#interp-a", digit)
    p.set_input_files("#interp-b", other)
    p.select_option("#interp-mode", "slerp")
    p.click("#interp-button")
    loaded(p, "#interp-strip img")
    assert p.locator("#interp-strip img").count() == 8
    tops = p.evaluate("[...document.querySelectorAll('#interp-strip img')].map((i) => i.y)")
    assert len(set(tops)) == 1, f"the path is not one strip: rows at {sorted(set(tops))}"
    assert p.evaluate(BROKEN_IMAGES) == []

    p.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert page.errors == []


def test_a_dropped_file_that_is_not_an_image_shows_the_error(page: Page) -> None:
    p = page.page
    # dropped on the drop zone, as a user would drag it there
    junk = p.evaluate_handle(
        """(bytes) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], "junk.png", {type: "image/png"}));
            return transfer;
        }""",
        list(b"not an image"),
    )
    p.dispatch_event("#drop-zone", "drop", {"dataTransfer": junk})
    alert = p.locator("#score-status.error")
    alert.wait_for()
    assert "422" in alert.text_content() and "is not an image" in alert.text_content()
    assert alert.get_attribute("role") == "alert"


def test_the_api_key_field(browser: Any, bundle: Path, live_server: LiveServerFactory) -> None:
    with live_server(bundle, env={"VAE_API_KEY": "s3cret"}) as server:
        p = Page(browser, server.url).page
        p.click("#sample-button")
        p.locator("#sample-status.error").wait_for()
        assert "401" in (p.text_content("#sample-status") or "")
        p.fill("#api-key", "s3cret")
        p.click("#key-form button")
        p.click("#sample-button")
        loaded(p, "#sample-grid")
        assert p.evaluate("sessionStorage.getItem('vae-api-key')") == "s3cret"
        p.reload()  # the key survives a reload within the session
        assert p.input_value("#api-key") == "s3cret"
        p.close()


# ReDoc's standalone bundle hard-codes the "API docs by Redocly" footer logo from its CDN (no
# option turns it off); offline that 16-pixel logo is missing and nothing else.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.mark.parametrize(
    "path, rendered",
    [
        ("/docs", ".swagger-ui .opblock-summary-path >> text=/elbo"),
        ("/redoc", ".redoc-wrap >> text=/reconstruct"),
    ],
)
def test_the_api_docs_work_offline(
    browser: Any, server: httpx.Client, path: str, rendered: str
) -> None:
    """Swagger UI and ReDoc render the API from the server's own assets: every request that
    leaves the server is blocked (and fails the test), as on a machine without internet."""
    docs = Page(browser, str(server.base_url).rstrip("/"), path)
    try:
        docs.page.locator(rendered).first.wait_for()
        foreign = [url for url in docs.foreign if url != REDOC_LOGO]
        assert foreign == [], "the docs fetched from outside the server"
        assert [e for e in docs.errors if "ERR_FAILED" not in e] == []
    finally:
        docs.page.close()
