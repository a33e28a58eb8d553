"""Model endpoints (service/routing.py): their contract, the order of checks, their document."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest
from fastapi import APIRouter, Query, Request, Response
from fastapi.testclient import TestClient
from pydantic import BaseModel

from service.deps import ServedDep
from service.main import create_app
from service.routing import ModelRoute
from service.settings import Settings
from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, stroke


class Options(BaseModel):
    n: int = 1


def test_an_endpoint_off_the_contract_is_refused_when_its_route_is_made() -> None:
    router = APIRouter(route_class=ModelRoute)

    async def wrong(request: Request, query: Annotated[Options, Query()]) -> Response:
        return Response()

    with pytest.raises(TypeError, match=r"/wrong: a ModelRoute endpoint takes \(served, request"):
        router.add_api_route("/wrong", wrong, methods=["POST"])

    async def right(
        served: ServedDep, request: Request, query: Annotated[Options, Query()]
    ) -> Response:
        return Response()

    router.add_api_route("/right", right, methods=["POST"])  # no error


def test_the_caller_is_checked_before_the_query_and_the_body(make_client: MakeClient) -> None:
    with make_client(api_key="secret") as client:
        bad = client.post("/elbo", params={"k": "many", "map": "gif"}, content=b"not an image")
        assert bad.status_code == 401, bad.text
        assert "missing API key" in bad.json()["detail"]
        headers = {"X-API-Key": "secret"}
        bad = client.post("/elbo", params={"k": "many", "map": "gif"}, headers=headers)
        assert bad.status_code == 422, bad.text
        errors = {tuple(error["loc"]): error["msg"] for error in bad.json()["detail"]}
        assert errors == {
            ("query", "k"): "Input should be a valid integer, unable to parse string as an integer",
            ("query", "map"): "Input should be 'array' or 'png'",
        }
        ok = client.post("/elbo", params={"k": "2"}, files=files(encode(stroke())), headers=headers)
        assert ok.status_code == 200, ok.text
        assert ok.json()["results"][0]["iwae"] is not None


def test_errors_below_the_endpoint_become_the_apps_responses(make_client: MakeClient) -> None:
    with make_client(max_rows=4) as client:
        over = client.post("/elbo", params={"samples": 3}, files=files(*[encode(stroke())] * 2))
        assert over.status_code == 422
        assert over.json()["detail"][0]["type"] == "over_budget"
        assert "VAE_MAX_ROWS" in over.json()["detail"][0]["msg"]
        unknown = client.post("/encode", headers={"Content-Type": "text/csv"}, content=b"1,2")
        assert unknown.status_code == 415
        assert "unsupported media type: Content-Type text/csv" in unknown.json()["detail"]
        slash = client.post("/encode/", files=files(encode(stroke())), follow_redirects=False)
        assert slash.status_code == 307  # FastAPI's own redirect: only exact paths are shortcut


def test_the_document_comes_from_the_same_signatures(make_client: MakeClient) -> None:
    with make_client(max_rows=500) as client:
        paths = client.get("/openapi.json").json()["paths"]
    elbo = {p["name"]: p for p in paths["/elbo"]["post"]["parameters"]}
    assert set(elbo) == {"samples", "k", "seed", "score", "threshold", "map"}
    assert elbo["samples"]["schema"]["maximum"] == 500  # VAE_MAX_ROWS
    assert elbo["map"]["schema"]["anyOf"][0]["enum"] == ["array", "png"]
    sample = {p["name"] for p in paths["/sample"]["get"]["parameters"]}
    assert sample == {"format", "n", "seed", "temperature"}
    decode = paths["/decode"]["post"]
    assert decode["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DecodeRequest"
    }
    assert {"400", "413", "415", "422", "503"} <= set(decode["responses"])


def test_behind_a_root_path(tiny_bundle: Path) -> None:
    app = create_app(Settings(bundle=tiny_bundle))
    with TestClient(app, root_path="/vae") as client:
        response = client.post("/vae/encode", files=files(encode(stroke())))
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 1
        metrics = client.get("/vae/metrics").text
    assert 'vae_http_requests_total{endpoint="/encode",method="POST",status="200"} 1.0' in metrics
