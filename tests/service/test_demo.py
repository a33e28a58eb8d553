"""GET / and /static/...: the demo page, served without a build step or a CDN."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.routes.demo import STATIC_DIR
from tests.service.conftest import MakeClient


def test_the_page_and_its_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "<title>VAE server demo</title>" in page.text
    for path, media in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        response = client.get(path)
        assert response.status_code == 200 and media in response.headers["content-type"]


def test_everything_the_page_references_is_local(client: TestClient) -> None:
    html = client.get("/").text
    references = [r for r in re.findall(r'(?:src|href)="([^"]+)"', html) if r != "data:,"]
    assert references and not [r for r in references if "//" in r]
    for reference in references:
        assert client.get(reference).status_code == 200, reference
    for name in ("app.js", "style.css"):
        assert "http://" not in (STATIC_DIR / name).read_text()
        assert "https://" not in (STATIC_DIR / name).read_text()


@pytest.mark.parametrize(
    "path", ["/static/nope.js", "/static/../main.py", "/static/%2e%2e/main.py"]
)
def test_missing_and_outside_files_are_404(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_open_without_the_api_key_and_out_of_the_schema(make_client: MakeClient) -> None:
    with make_client(api_key="s3cret") as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/sample").status_code == 401
        paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


def test_the_page_ships_with_the_package() -> None:
    assert {p.name for p in STATIC_DIR.iterdir()} >= {"index.html", "app.js", "style.css"}
