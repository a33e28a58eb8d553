"""What a client can send to stall, crash or mislead the server, in-process (tests/e2e and
tests/stress drive a real server): body limits, strict values, disconnects, truthful OpenAPI."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

import service.parsing
from service.bundle import Bundle
from service.errors import MAX_JSON_BYTES
from service.main import create_app
from service.memory import RELEASE_ROWS
from service.parsing import INLINE_BODY_BYTES
from service.schemas import DecodeRequest, ImagesRequest
from service.settings import Settings
from tests.service.conftest import MakeClient
from tests.service.helpers import encode, files, rewrite_manifest, stroke

PNG = encode(stroke())


def test_model_shows_no_training_machine_paths(
    make_client: MakeClient, tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = rewrite_manifest(
        tiny_bundle,
        tmp_path / "paths",
        data={"source": "/home/trainer/data/mnist", "train_images": 100},
        training={"init_from": "runs/mnist-conv/checkpoint_best.pt", "epochs": 2},
    )
    with make_client(bundle=bundle) as client:
        body = client.get("/model").json()
    assert body["data"] == {"source": "mnist", "train_images": 100}
    assert body["training"] == {"init_from": "checkpoint_best.pt", "epochs": 2}
    assert "/home/trainer" not in json.dumps(body)


@pytest.mark.parametrize("value", ["0", True, None, [0.0]])
def test_decode_takes_numbers_only(client: TestClient, value: Any) -> None:
    response = client.post("/decode", json={"z": [[value] + [0.0] * 7]})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "z", 0, 0]


def test_decode_takes_json_integers(client: TestClient) -> None:
    assert client.post("/decode", json={"z": [[0, 1] + [0.0] * 6]}).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_head(client: TestClient, path: str) -> None:
    response = client.head(path)
    assert response.status_code == 200
    assert response.content == b""


def test_metrics_label_v2_routes_with_their_prefix(client: TestClient) -> None:
    assert client.get("/v2/models/tiny-bernoulli-encoder").status_code == 200
    metrics = client.get("/metrics").text
    assert 'endpoint="/v2/models/{model_name}",method="GET",status="200"' in metrics
    assert 'endpoint="/models/{model_name}"' not in metrics


def test_the_event_loop_lag_is_a_histogram(client: TestClient) -> None:
    time.sleep(0.2)  # the watcher samples every 25 ms
    metrics = client.get("/metrics").text
    count = next(
        line for line in metrics.splitlines() if line.startswith("vae_event_loop_lag_seconds_count")
    )
    assert float(count.split()[-1]) >= 2


def test_a_truncated_multipart_body_says_so(client: TestClient) -> None:
    boundary = "b0undary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + PNG
    complete = part + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    assert client.post("/encode", content=complete, headers=headers).status_code == 200
    for cut in (part[:-100], part + part[:50]):
        response = client.post("/encode", content=cut, headers=headers)
        assert response.status_code == 400
        assert response.json()["detail"] == (
            f"the multipart body is truncated or malformed: its {len(cut)} bytes do not end with "
            f"the closing delimiter CRLF '--{boundary}--' after the last part"
        )


def _part(boundary: str, data: bytes, name: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + data


@pytest.mark.parametrize(
    "close",
    [b"--b0undary--\r\n", b"--b0undary--", b"x--b0undary--\r\n"],
    ids=["no-crlf-before", "no-crlf-at-all", "inside-the-data"],
)
def test_a_closing_delimiter_that_is_not_one_never_drops_an_image(
    client: TestClient, close: bytes
) -> None:
    # the closing boundary's text without the CRLF before it is part of the last part's data:
    # the parser never ends that part, and the server must not answer for the first image alone
    body = _part("b0undary", PNG, "a.png") + b"\r\n" + _part("b0undary", PNG, "b.png") + close
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    response = client.post("/encode", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert "do not end with the closing delimiter CRLF '--b0undary--'" in response.json()["detail"]


@pytest.mark.parametrize("before", [b"", b"\n"], ids=["no-line-break", "bare-lf"])
def test_a_middle_delimiter_that_is_not_one_never_drops_an_image(
    client: TestClient, before: bytes
) -> None:
    # without the CRLF before it, the second delimiter is part of the first image's data: the
    # PNG decoder would ignore what follows its end, and the second image would be lost
    body = _part("b0undary", PNG, "a.png") + before + _part("b0undary", PNG, "b.png")
    body += b"\r\n--b0undary--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    response = client.post("/elbo", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == (
        "malformed multipart body: the boundary '--b0undary' opens 2 parts but 1 are well formed; "
        "each delimiter must start a line (CRLF before it), and nothing may follow the closing one"
    )


def test_a_part_after_the_closing_delimiter_is_refused(client: TestClient) -> None:
    one = _part("b0undary", PNG, "a.png") + b"\r\n--b0undary--\r\n"
    body = one + _part("b0undary", PNG, "b.png") + b"\r\n--b0undary--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    assert client.post("/encode", content=one, headers=headers).status_code == 200
    response = client.post("/encode", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert "opens 3 parts but 1 are well formed" in response.json()["detail"]


def test_a_multipart_preamble_and_epilogue_are_ignored(client: TestClient) -> None:
    # RFC 2046 5.1.1: text before the first delimiter and after the closing one is not a part
    two = _part("b0undary", PNG, "a.png") + b"\r\n" + _part("b0undary", PNG, "b.png")
    body = b"This is a preamble.\r\n" + two + b"\r\n--b0undary--\r\nAn epilogue."
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    response = client.post("/encode", content=body, headers=headers)
    assert response.status_code == 200, response.text
    plain = client.post("/encode", files=files(PNG, PNG)).json()
    assert response.json()["results"] == plain["results"]
    no_delimiter = client.post("/encode", content=b"no part here--b0undary--", headers=headers)
    assert no_delimiter.status_code == 400
    assert "no line starts with the boundary '--b0undary'" in no_delimiter.json()["detail"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/decode", '{"z": "\\ud800"}'),
        ("/decode", '{"z\\udfff": [[0, 0, 0, 0, 0, 0, 0, 0]]}'),
        ("/encode", '{"images": ["\\ud800"]}'),
        ("/elbo", '{"pixels": [["\\udc80"]]}'),
    ],
)
def test_an_unpaired_surrogate_gets_a_422_not_a_500(
    client: TestClient, path: str, body: str
) -> None:
    # "\ud800" is valid JSON, but no UTF-8 text: the 422 that echoes it must still encode
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"


def test_a_v2_request_id_with_an_unpaired_surrogate_comes_back_escaped(client: TestClient) -> None:
    body = '{"id": "run-\\ud800", "inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", '
    body += '"data": [0, 0, 0, 0, 0, 0, 0, 0]}]}'
    response = client.post("/v2/models/tiny-bernoulli-decoder/infer", content=body)
    assert response.status_code == 200, response.text
    assert b'"id":"run-\\ud800"' in response.content
    assert json.loads(response.content)["id"] == "run-\ud800"


@pytest.mark.parametrize(
    "path, body",
    [
        ("/encode", '{"pixels": [[[0]]], "pixels": [[[0]], [[1]]]}'),
        ("/decode", '{"z": [[0, 0, 0, 0, 0, 0, 0, 0]], "z": []}'),
        ("/v2/models/tiny-bernoulli-decoder/infer", '{"inputs": [], "inputs": []}'),
    ],
)
def test_a_key_given_twice_is_refused(client: TestClient, path: str, body: str) -> None:
    # the last one silently won: {"images": [a, b], "images": [a]} was scored as one image
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert "given twice; give each key once" in response.text


def test_two_content_types_are_refused(client: TestClient) -> None:
    # the body limit and the route would each read a different one: JSON past its 1 MiB limit
    headers = [("Content-Type", "application/json"), ("Content-Type", "image/png")]
    response = client.post("/encode", content=PNG, headers=headers)
    assert response.status_code == 400
    assert response.json() == {
        "detail": "the request has more than one Content-Type header; send one"
    }


@pytest.mark.parametrize("path", ["/encode", "/v2/models/tiny-bernoulli-encoder/infer"])
def test_a_compressed_body_gets_a_415_naming_its_encoding(client: TestClient, path: str) -> None:
    headers = {"Content-Type": "image/png", "Content-Encoding": "gzip"}
    response = client.post(path, content=gzip.compress(PNG), headers=headers)
    assert response.status_code == 415
    key = "error" if path.startswith("/v2/") else "detail"
    assert response.json() == {
        key: "Content-Encoding 'gzip' is not supported: send the body as it is"
    }
    identity = {"Content-Type": "image/png", "Content-Encoding": "identity"}
    assert client.post("/encode", content=PNG, headers=identity).status_code == 200


def test_a_transfer_coding_other_than_chunked_is_501(client: TestClient) -> None:
    headers = {"Content-Type": "image/png", "Transfer-Encoding": "gzip, chunked"}
    response = client.post("/encode", content=iter([gzip.compress(PNG)]), headers=headers)
    assert response.status_code == 501
    assert response.json() == {
        "detail": "Transfer-Encoding 'gzip, chunked' is not supported; send it chunked"
    }


def test_a_seed_without_sample_is_a_422(client: TestClient) -> None:
    response = client.post("/encode?seed=5", files=files(PNG))
    assert response.status_code == 422
    assert "seed draws z, which only sample=true does" in response.json()["detail"][0]["msg"]
    drawn = client.post("/encode?seed=5&sample=true", files=files(PNG)).json()
    assert drawn["seed"] == 5


@pytest.mark.parametrize(
    "path, query, loc, message",
    [
        ("/elbo", "K=5", "K", "unknown query parameter; this endpoint takes samples, k, seed, "),
        ("/elbo", "k=2&k=3", "k", "given 2 times; give it once"),
        ("/encode", "seeed=1", "seeed", "unknown query parameter; this endpoint takes "),
        ("/decode", "temperature=2", "temperature", "unknown query parameter; this endpoint takes"),
    ],
)
def test_a_query_parameter_the_endpoint_does_not_take_is_a_422(
    client: TestClient, path: str, query: str, loc: str, message: str
) -> None:
    # a misspelt option must not quietly run with its default
    if path == "/decode":
        response = client.post(f"{path}?{query}", json={"z": [[0.0] * 8]})
    else:
        response = client.post(f"{path}?{query}", files=files(PNG))
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", loc]
    assert error["msg"].startswith(message)


def test_v2_errors_from_the_router_use_the_protocol_format(client: TestClient) -> None:
    response = client.get("/v2/models/tiny-bernoulli-encoder/infer")
    assert response.status_code == 405
    assert response.json() == {"error": "Method Not Allowed"}
    assert client.get("/encode").json() == {"detail": "Method Not Allowed"}


MULTIPART = "multipart/form-data; boundary=b"
FILE_PART = b'--b\r\nContent-Disposition: form-data; name="i"; filename="a.png"\r\n\r\nx\r\n'


@pytest.mark.parametrize(
    "body, content_type, status, message",
    [
        (b"--b\r\n\r\nx\r\n--b--\r\n", "multipart/form-data", 400, "has no boundary"),
        (b"--bXYZ\r\n\r\nx\r\n--b--\r\n", MULTIPART, 400, "malformed multipart body: Did not"),
        (b"--b\r\nNo colon here\r\n\r\nx\r\n--b--\r\n", MULTIPART, 400, "invalid character"),
        (
            FILE_PART * 8193 + b"--b--\r\n",
            MULTIPART,
            422,
            "Input should be less than or equal to 8192 (VAE_MAX_ROWS); got 8193",
        ),
        (
            b"--b\r\nContent-Type: image/png\r\n\r\nx\r\n--b--\r\n",
            MULTIPART,
            422,
            "form field '0' is not a file upload",
        ),
        (b"--b--\r\n", MULTIPART, 422, "no images: send at least one image"),
    ],
    ids=["no-boundary", "junk", "header", "parts", "no-filename", "empty"],
)
def test_malformed_multipart_gets_a_4xx_naming_it_and_no_log(
    client: TestClient,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    content_type: str,
    status: int,
    message: str,
) -> None:
    with caplog.at_level(logging.INFO):
        response = client.post("/encode", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert message in response.text
    # the parser's own complaint is not logged: a client cannot flood the log
    assert not [r for r in caplog.records if r.name.startswith("python_multipart")]


@pytest.mark.parametrize(
    "method, path, body, model",
    [
        ("POST", "/decode", lambda rows: {"z": [[0.25] * 8] * rows}, DecodeRequest),
        (
            "POST",
            "/encode",
            lambda rows: {"pixels": [[[0.5] * 28] * 28] * (rows // 100)},
            ImagesRequest,
        ),
        (
            "POST",
            "/v2/models/tiny-bernoulli-decoder/infer",
            lambda rows: {
                "inputs": [
                    {"name": "z", "shape": [rows, 8], "datatype": "FP32", "data": [0.25] * 8 * rows}
                ]
            },
            None,  # FastAPI validates the body parameter itself
        ),
    ],
    ids=["decode", "encode-pixels", "v2-infer"],
)
def test_large_json_bodies_are_parsed_off_the_event_loop(
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    body: Any,
    model: type[BaseModel] | None,
) -> None:
    """A JSON body over INLINE_BODY_BYTES is parsed, and for the model endpoints validated, in a
    worker thread (no running event loop there), a small one on the loop; both answer the same."""
    on_loop: list[bool] = []
    validated_on_loop: list[bool] = []

    def running_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    loads = json.loads

    def recording_loads(data: Any, **kwargs: Any) -> Any:
        on_loop.append(running_loop())
        return loads(data, **kwargs)

    monkeypatch.setattr("service.parsing.json.loads", recording_loads)
    if model is not None:
        validate = model.model_validate

        def recording_validate(obj: Any) -> Any:
            validated_on_loop.append(running_loop())
            return validate(obj)

        monkeypatch.setattr(model, "model_validate", recording_validate)
    small, large = json.dumps(body(200)), json.dumps(body(4000))
    assert len(small) <= INLINE_BODY_BYTES < len(large) <= MAX_JSON_BYTES
    for content in (small, large):
        answer = client.request(
            method, path, content=content, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 200, answer.text
    assert on_loop == [True, False]
    assert validated_on_loop == ([] if model is None else [True, False])


def test_large_multipart_bodies_are_parsed_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """python-multipart is Python: a body over INLINE_BODY_BYTES is parsed in a worker thread
    (no running event loop there), a small one on the loop; both answer."""
    on_loop: list[bool] = []
    file_parts = service.parsing._file_parts

    def recording(body: bytes, boundary: bytes, found: int) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return file_parts(body, boundary, found)

    monkeypatch.setattr("service.parsing._file_parts", recording)
    count = INLINE_BODY_BYTES // len(PNG) + 1
    assert len(PNG) * count > INLINE_BODY_BYTES
    for images in ([PNG], [PNG] * count):
        answer = client.post("/encode", files=files(*images))
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["results"]) == len(images)
    assert on_loop == [True, False]


def test_json_bodies_are_bounded_below_the_upload_limit(client: TestClient) -> None:
    body = json.dumps({"z": [[0.0] * 8] * 40_000})
    assert len(body) > MAX_JSON_BYTES
    response = client.post("/decode", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"JSON request body is {len(body)} bytes, over the limit of {MAX_JSON_BYTES} bytes for "
        "JSON; send large inputs as files (multipart), a raw image or an application/x-npy body"
    )
    npy_sized = client.post(
        "/encode", content=b"x" * (MAX_JSON_BYTES + 1), headers={"Content-Type": "image/png"}
    )
    assert npy_sized.status_code == 422  # other bodies keep VAE_MAX_UPLOAD_BYTES


def test_a_client_that_disconnects_is_one_log_line(
    tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(Settings(bundle=tiny_bundle))
    sent: list[dict[str, Any]] = []
    chunks = [
        {
            "type": "http.request",
            "body": b"--b\r\nContent-Disposition: form-data; ",
            "more_body": True,
        },
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/encode",
        "raw_path": b"/encode",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5555),
        "headers": [(b"content-type", b"multipart/form-data; boundary=b")],
    }

    async def run() -> None:
        async with app.router.lifespan_context(app):
            caplog.clear()
            with caplog.at_level(logging.INFO):
                await app(scope, receive, send)  # type: ignore[arg-type]

    asyncio.run(run())
    records = [r for r in caplog.records if r.name.startswith(("service", "uvicorn"))]
    assert [r.getMessage() for r in records] == [
        "127.0.0.1:5555 disconnected before sending all of POST /encode"
    ]
    assert not any(r.exc_info for r in caplog.records)
    assert sent[0]["status"] == 499


def test_openapi_has_no_security_scheme_without_a_key(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    assert "security" not in schema["paths"]["/encode"]["post"]
    assert "401" not in schema["paths"]["/encode"]["post"]["responses"]


def test_openapi_tells_the_truth(make_client: MakeClient) -> None:
    with make_client(api_key="s3cret") as client:
        schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"] == {
        "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "BearerAuth": {"type": "http", "scheme": "bearer"},
    }
    paths = schema["paths"]
    for path, method in [("/encode", "post"), ("/sample", "get"), ("/admin/reload", "post")]:
        operation = paths[path][method]
        assert operation["security"] == [{"APIKeyHeader": []}, {"BearerAuth": []}], path
        assert "401" in operation["responses"], path
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in paths[path]["get"]
    assert set(paths["/encode"]["post"]["responses"]) >= {"400", "413", "415", "422", "503"}


def test_openapi_bounds_each_count_by_the_row_budget(make_client: MakeClient) -> None:
    with make_client(max_rows=300) as client:
        paths = client.get("/openapi.json").json()["paths"]
        # the documented maximum is accepted, one more is the budget's 422
        assert client.get("/sample", params={"n": 300, "format": "arrays"}).status_code == 200
        assert client.get("/sample", params={"n": 301}).status_code == 422

    def maximum(path: str, method: str, name: str) -> int:
        (parameter,) = [p for p in paths[path][method]["parameters"] if p["name"] == name]
        options = parameter["schema"].get("anyOf", [parameter["schema"]])
        return next(o["maximum"] for o in options if o.get("type") == "integer")

    assert maximum("/sample", "get", "n") == 300
    assert maximum("/interpolate", "post", "steps") == 300
    assert maximum("/elbo", "post", "k") == maximum("/elbo", "post", "samples") == 300
    images = paths["/encode"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert images["properties"]["images"]["maxItems"] == 300


def test_a_large_request_gives_its_memory_back(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: list[str] = []
    release = Bundle.release_memory
    monkeypatch.setattr(
        Bundle, "release_memory", lambda self: released.append(self.manifest.name) or release(self)
    )
    with make_client() as client:
        small = client.post("/elbo", json={"pixels": [[[0.5]]] * 2}, params={"k": 8})
        assert small.status_code == 200 and released == []
        rows = 8 * 1000
        assert rows >= RELEASE_ROWS
        large = client.post(
            "/elbo", json={"pixels": [[[0.5]]] * 8}, params={"k": 1000, "score": "neg_iwae"}
        )
        assert large.status_code == 200
        deadline = time.monotonic() + 10
        while not released and time.monotonic() < deadline:
            time.sleep(0.05)  # released in the background, after the answer
        assert client.post("/elbo", json={"pixels": [[[0.5]]] * 2}, params={"k": 8}).json() == (
            small.json()
        )
    assert released == ["tiny-bernoulli"]
