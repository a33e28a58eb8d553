"""The Open Inference Protocol (KServe v2) endpoints."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import MakeClient
from tests.service.helpers import noise, stroke

ENCODER = "tiny-bernoulli-encoder"
DECODER = "tiny-bernoulli-decoder"
VERSION = "0.0.1"
D = 8


def tensor(name: str, array: Any, datatype: str = "FP32", shape: Any = None) -> dict[str, Any]:
    """A request input: `array` flattened, with its own shape unless one is given."""
    array = np.asarray(array)
    return {
        "name": name,
        "shape": list(array.shape) if shape is None else shape,
        "datatype": datatype,
        "data": array.ravel().tolist(),
    }


def infer(client: TestClient, model: str, *inputs: dict[str, Any], **body: Any) -> Any:
    return client.post(f"/v2/models/{model}/infer", json={"inputs": list(inputs), **body})


def outputs(response: Any) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return {
        out["name"]: np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        for out in response.json()["outputs"]
    }


def images() -> np.ndarray:
    """Three 1x28x28 images in [0, 1], `(3, 1, 28, 28)`."""
    return np.stack([stroke(6), noise(1), stroke(18)])[:, None]


def test_server_metadata_and_health(client: TestClient) -> None:
    assert client.get("/v2").json() == {"name": "vae-server", "version": "0.1.0", "extensions": []}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("version", ["", f"/versions/{VERSION}"])
def test_model_metadata(client: TestClient, version: str) -> None:
    encoder = client.get(f"/v2/models/{ENCODER}{version}")
    assert encoder.status_code == 200
    assert encoder.json() == {
        "name": ENCODER,
        "versions": [VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [
            {"name": "mu", "datatype": "FP32", "shape": [-1, D]},
            {"name": "logvar", "datatype": "FP32", "shape": [-1, D]},
        ],
    }
    decoder = client.get(f"/v2/models/{DECODER}{version}").json()
    assert decoder["inputs"] == [{"name": "z", "datatype": "FP32", "shape": [-1, D]}]
    assert decoder["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    for name in (ENCODER, DECODER):
        ready = client.get(f"/v2/models/{name}{version}/ready")
        assert (ready.status_code, ready.json()) == (200, {"ready": True})


def test_gaussian_decoder_outputs_the_mean(gaussian_client: TestClient) -> None:
    metadata = gaussian_client.get("/v2/models/tiny-gaussian-decoder").json()
    assert [out["name"] for out in metadata["outputs"]] == ["mean"]


def test_encoder_matches_encode(client: TestClient) -> None:
    x = images()
    ours = client.post("/encode", json={"pixels": x.tolist()}).json()["results"]
    response = infer(client, ENCODER, tensor("x", x), id="req-1")
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (ENCODER, VERSION, "req-1")
    assert [(o["name"], o["shape"], o["datatype"]) for o in body["outputs"]] == [
        ("mu", [3, D], "FP32"),
        ("logvar", [3, D], "FP32"),
    ]
    out = outputs(response)
    # the same float32 numbers, not merely close: both run the same session on the same pixels
    assert out["mu"].tolist() == [r["mu"] for r in ours]
    assert out["logvar"].tolist() == [r["logvar"] for r in ours]


def test_nested_data_and_versioned_path_agree(client: TestClient) -> None:
    x = images()
    flat = outputs(infer(client, ENCODER, tensor("x", x)))
    nested = {**tensor("x", x), "data": x.tolist()}
    response = client.post(
        f"/v2/models/{ENCODER}/versions/{VERSION}/infer", json={"inputs": [nested]}
    )
    for name, value in outputs(response).items():
        np.testing.assert_array_equal(value, flat[name])
    assert "id" not in response.json()


def test_decoder_matches_decode_and_reconstruct(client: TestClient) -> None:
    x = images()[:1]
    mu = outputs(infer(client, ENCODER, tensor("x", x)))["mu"]  # (1, D)
    logits = outputs(infer(client, DECODER, tensor("z", mu)))["logits"]
    assert logits.shape == (1, 1, 28, 28)
    ours = client.post("/reconstruct?format=arrays", json={"pixels": x.tolist()}).json()
    np.testing.assert_allclose(1 / (1 + np.exp(-logits[0, 0])), ours["arrays"][0][0], atol=1e-6)


def test_an_answer_written_in_pieces_is_the_whole_answer(client: TestClient) -> None:
    # 100 rows of 784 logits: two pieces of FLOATS_PER_PIECE and a rest, joined into one array
    z = np.random.default_rng(0).standard_normal((100, D)).astype(np.float32)
    response = infer(client, DECODER, tensor("z", z), id="pieces")
    assert response.json()["id"] == "pieces"
    logits = outputs(response)["logits"]
    assert logits.shape == (100, 1, 28, 28)
    ours = client.post("/decode?format=arrays", json={"z": z.tolist()}).json()["arrays"]
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), ours, atol=1e-6)
    one_by_one = [outputs(infer(client, DECODER, tensor("z", row[None])))["logits"] for row in z]
    np.testing.assert_allclose(logits, np.concatenate(one_by_one), atol=1e-5)


@pytest.mark.parametrize(
    "requested, names", [(["logvar"], ["logvar"]), (["logvar", "mu", "logvar"], ["logvar", "mu"])]
)
def test_output_selection(client: TestClient, requested: list[str], names: list[str]) -> None:
    selection = [{"name": name} for name in requested]
    response = infer(client, ENCODER, tensor("x", images()), outputs=selection)
    assert [out["name"] for out in response.json()["outputs"]] == names


def test_integers_are_taken_as_fp32(client: TestClient) -> None:
    z = np.zeros((2, D), dtype=np.int64)
    response = infer(client, DECODER, tensor("z", z))
    assert outputs(response)["logits"].shape == (2, 1, 28, 28)


ZEROS = np.zeros((1, 1, 28, 28)).ravel().tolist()


def x_input(**changes: Any) -> dict[str, Any]:
    return {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ZEROS, **changes}


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([x_input(datatype="FP64")], "input 'x' has datatype 'FP64'; this model takes FP32"),
        ([x_input(datatype="INT32")], "input 'x' has datatype 'INT32'; this model takes FP32"),
        ([x_input(shape=[1, 28, 28])], "input 'x' has shape [1, 28, 28]; the model takes [-1, 1, 28, 28]"),  # noqa: E501
        ([x_input(shape=[1, 3, 28, 28])], "input 'x' has shape [1, 3, 28, 28]; the model takes [-1, 1, 28, 28]"),  # noqa: E501
        ([x_input(shape=[0, 1, 28, 28], data=[])], "input 'x' has a batch of 0; send at least one row"),  # noqa: E501
        ([x_input(shape=[-1, 1, 28, 28])], "input 'x' has a batch of -1; send at least one row"),
        ([x_input(shape=[2, 1, 28, 28])], "input 'x' has 784 values; its shape [2, 1, 28, 28] needs 1568"),  # noqa: E501
        ([x_input(data=ZEROS[:-1])], "input 'x' has 783 values; its shape [1, 1, 28, 28] needs 784"),  # noqa: E501
        ([x_input(data=[[0.0] * 28] * 28)], "input 'x' has nested data of shape [28, 28]; its shape is [1, 1, 28, 28] (or send the data flat)"),  # noqa: E501
        ([x_input(data=[[0.0], [0.0, 1.0]])], "input 'x': data is ragged; send it flat or nested to the shape"),  # noqa: E501
        ([x_input(data=["0.5"] * 784)], "input 'x': data must hold only numbers"),
        ([x_input(data=[True] * 784)], "input 'x': data must hold only numbers"),
        ([x_input(data=[None] * 784)], "input 'x': data must hold only numbers"),
        ([x_input(data=[2.0] * 784)], "input 'x' has values in [2, 2]; pixel values must be in [0, 1] (divide 8-bit data by 255)"),  # noqa: E501
        ([x_input(data=[1e39] * 784)], "input 'x' has NaN, infinite or out-of-float32-range values"),  # noqa: E501
        ([], "model 'tiny-bernoulli-encoder' takes one input named 'x'; got none"),
        ([x_input(name="z")], "model 'tiny-bernoulli-encoder' takes one input named 'x'; got ['z']"),  # noqa: E501
        ([x_input(), x_input()], "model 'tiny-bernoulli-encoder' takes one input named 'x'; got ['x', 'x']"),  # noqa: E501
        ([{"name": "x", "shape": [1]}], "body.inputs.0.datatype: Field required; body.inputs.0.data: Field required"),  # noqa: E501
        ([x_input(shape="1,1,28,28")], "body.inputs.0.shape: Input should be a valid list"),
        ([x_input(extra=1)], "body.inputs.0: unknown key(s) 'extra'; this body accepts 'name', 'shape', 'datatype', 'parameters', 'data'"),  # noqa: E501
    ],
)  # fmt: skip
def test_bad_inputs_are_400(client: TestClient, inputs: list[Any], message: str) -> None:
    response = infer(client, ENCODER, *inputs)
    assert (response.status_code, response.json()) == (400, {"error": message})


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_400(client: TestClient, token: bytes) -> None:
    z = b"[" + b", ".join([b"0.0"] * (D - 1) + [token]) + b"]"
    body = b'{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": ' + z + b"}]}"
    response = client.post(
        f"/v2/models/{DECODER}/infer", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "input 'z' has NaN, infinite or out-of-float32-range values"
    }


@pytest.mark.parametrize(
    "body, message",
    [
        ({"inputs": [x_input()], "outputs": [{"name": "z"}]}, "model 'tiny-bernoulli-encoder' has no output 'z'; its outputs are mu, logvar"),  # noqa: E501
        ({"inputs": [x_input()], "id": 42}, "body.id: Input should be a valid string"),
        ({"inputs": [x_input()], "parameters": {"a": [1]}}, "body.parameters.a.str: Input should be a valid string; body.parameters.a.int: Input should be a valid integer; body.parameters.a.float: Input should be a valid number; body.parameters.a.bool: Input should be a valid boolean"),  # noqa: E501
        ({}, "body.inputs: Field required"),
        ([], "body: Input should be a valid dictionary or object to extract fields from"),
    ],
)  # fmt: skip
def test_bad_requests_are_400(client: TestClient, body: Any, message: str) -> None:
    response = client.post(f"/v2/models/{ENCODER}/infer", json=body)
    assert (response.status_code, response.json()) == (400, {"error": message})


def test_parameters_are_accepted(client: TestClient) -> None:
    body = {"inputs": [{**x_input(), "parameters": {"a": 1}}], "parameters": {"b": "c"}}
    assert client.post(f"/v2/models/{ENCODER}/infer", json=body).status_code == 200


def test_not_json_is_400(client: TestClient) -> None:
    response = client.post(
        f"/v2/models/{ENCODER}/infer", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("body.1: JSON decode error")


def test_the_batch_limit_is_400(make_client: MakeClient) -> None:
    with make_client(max_rows=2) as client:
        ok = infer(client, DECODER, tensor("z", np.zeros((2, D))))
        assert ok.status_code == 200
        response = infer(client, DECODER, tensor("z", np.zeros((3, D))))
    assert (response.status_code, response.json()) == (
        400,
        {"error": "input 'z' has a batch of 3, over the limit of 2 (VAE_MAX_ROWS)"},
    )


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v2/models/{name}"),
        ("GET", "/v2/models/{name}/ready"),
        ("POST", "/v2/models/{name}/infer"),
        ("GET", "/v2/models/{name}/versions/{version}"),
        ("GET", "/v2/models/{name}/versions/{version}/ready"),
        ("POST", "/v2/models/{name}/versions/{version}/infer"),
    ],
)
def test_unknown_models_and_versions_are_404(client: TestClient, method: str, path: str) -> None:
    body = {"json": {"inputs": [x_input()]}} if method == "POST" else {}
    unknown = client.request(method, path.format(name="mnist-vae", version=VERSION), **body)
    assert (unknown.status_code, unknown.json()) == (
        404,
        {
            "error": "model 'mnist-vae' not found; this server has tiny-bernoulli-encoder, "
            "tiny-bernoulli-decoder"
        },
    )
    if "{version}" in path:
        wrong = client.request(method, path.format(name=ENCODER, version="9"), **body)
        assert (wrong.status_code, wrong.json()) == (
            404,
            {"error": "model 'tiny-bernoulli-encoder' has no version '9'; it has '0.0.1'"},
        )


def test_model_endpoints_need_the_api_key(make_client: MakeClient) -> None:
    with make_client(api_key="s3cret") as client:
        for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
            assert client.get(path).status_code == 200, path
        missing = client.get(f"/v2/models/{ENCODER}")
        assert missing.status_code == 401
        assert missing.json() == {
            "error": "missing API key: send it as X-API-Key or Authorization: Bearer <key>"
        }
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.post(
            f"/v2/models/{ENCODER}/infer",
            json={"inputs": [x_input()]},
            headers={"X-API-Key": "nope"},
        )
        assert (wrong.status_code, wrong.json()["error"][:15]) == (401, "invalid API key")
        bearer = {"Authorization": "Bearer s3cret"}
        assert client.get(f"/v2/models/{ENCODER}/ready", headers=bearer).status_code == 200
        ok = client.post(
            f"/v2/models/{ENCODER}/infer", json={"inputs": [x_input()]}, headers=bearer
        )
        assert ok.status_code == 200


def test_not_ready_before_the_bundle_is_loaded(tiny_bundle: Any) -> None:
    from service.main import create_app
    from service.settings import Settings

    client = TestClient(create_app(Settings(bundle=tiny_bundle)))  # no lifespan: nothing loaded
    ready = client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (400, {"ready": False})
    assert client.get("/v2/health/live").status_code == 200
    model = client.get(f"/v2/models/{ENCODER}/ready")
    assert (model.status_code, model.json()) == (
        503,
        {"error": "model not loaded yet; see GET /readyz"},
    )


def test_openapi_documents_the_v2_paths(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v2/models/{model_name}/versions/{model_version}/infer" in paths
    infer_op = paths["/v2/models/{model_name}/infer"]["post"]
    assert {"400", "401", "404"} <= set(infer_op["responses"])


def test_not_ready_while_draining(make_client: MakeClient) -> None:
    with make_client() as client:
        client.app.state.draining = True  # set on SIGTERM while in-flight requests finish
        ready = client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (400, {"ready": False})


def test_a_body_without_content_type_is_json(client: TestClient) -> None:
    """tritonclient sends its JSON requests without a Content-Type (a regression)."""
    body = json.dumps({"inputs": [x_input()]}).encode()
    response = client.post(f"/v2/models/{ENCODER}/infer", content=body)
    assert "content-type" not in response.request.headers
    assert response.status_code == 200, response.text


def test_binary_tensor_data_is_a_clear_400(client: TestClient) -> None:
    header = json.dumps({"inputs": [{**x_input(), "parameters": {"binary_data_size": 3136}}]})
    del_data = header.replace(', "data": [' + ", ".join(["0.0"] * 784) + "]", "")
    body = del_data.encode() + np.zeros(784, np.float32).tobytes()
    response = client.post(
        f"/v2/models/{ENCODER}/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(del_data))},
    )
    assert (response.status_code, response.json()) == (
        400,
        {
            "error": "binary tensor data (Inference-Header-Content-Length) is not supported; "
            "send the tensors as JSON data (tritonclient: set_data_from_numpy(array, "
            "binary_data=False))"
        },
    )
