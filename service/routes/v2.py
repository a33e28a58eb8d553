"""The Open Inference Protocol (KServe v2) REST API, beside our own: KServe and Triton clients work.

A bundle is served as two v2 models, one per ONNX graph, with the graphs' own tensor names:
`<bundle name>-encoder` (`x (B, C, H, W)` in [0, 1] -> `mu`, `logvar (B, D)`) and
`<bundle name>-decoder` (`z (B, D)` -> `logits` or `mean (B, C, H, W)`). Their one version is the
bundle's version. Errors are the spec's `{"error": "..."}`: 400 for a bad request, 404 for an
unknown model or version, 401 without the API key (model endpoints, as for our own API).

Spec: https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md
"""

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from math import prod
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from service import __version__
from service.deps import RuntimeDep, SettingsDep, require_api_key
from service.errors import JSONResponse, json_array, json_bytes
from service.parsing import JSONRoute
from service.runtime import F32, Runtime, off_loop
from service.v2_schemas import (
    ErrorV2,
    InferenceRequest,
    InferenceResponse,
    Live,
    ModelMetadata,
    Ready,
    RequestInput,
    ServerMetadata,
    TensorMetadata,
)

SERVER_NAME = "vae-server"
# Triton's binary tensor data extension: a JSON header of this many bytes, then raw tensors
BINARY_HEADER = "inference-header-content-length"
BINARY_UNSUPPORTED = (
    "binary tensor data (Inference-Header-Content-Length) is not supported; send the tensors as "
    "JSON data (tritonclient: set_data_from_numpy(array, binary_data=False))"
)
PLATFORM = "onnxruntime_onnx"
DATATYPE = "FP32"
# floats of an answer written at a time: about 5 ms of the GIL each on this project's machine
FLOATS_PER_PIECE = 1 << 16


def _error_text(exc: RequestValidationError) -> str:
    def text(error: dict[str, Any]) -> str:
        reason = (error.get("ctx") or {}).get("error")  # what the JSON decoder said, if it did
        return f"{'.'.join(map(str, error['loc']))}: {error['msg']}" + (
            f" ({reason})" if reason else ""
        )

    return "; ".join(text(error) for error in exc.errors())


class V2Route(JSONRoute):
    """Answers errors, its dependencies' included, in the protocol's `{"error": ...}` format."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            if BINARY_HEADER in request.headers:
                return JSONResponse({"error": BINARY_UNSUPPORTED}, status_code=400)
            try:
                return await handler(request)
            except HTTPException as exc:
                return JSONResponse(
                    {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
                )
            except RequestValidationError as exc:
                return JSONResponse({"error": _error_text(exc)}, status_code=400)

        return route_handler


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorV2, "description": "bad request: the message names the field"},
    401: {"model": ErrorV2, "description": "missing or invalid API key (VAE_API_KEY is set)"},
    404: {"model": ErrorV2, "description": "no such model or version"},
    503: {"model": ErrorV2, "description": "the bundle is not loaded yet"},
}

TAGS: list[str | Enum] = ["open inference protocol (v2)"]
server = APIRouter(prefix="/v2", tags=TAGS, route_class=V2Route)
models = APIRouter(
    prefix="/v2",
    tags=TAGS,
    dependencies=[Depends(require_api_key)],
    responses=ERRORS,
    route_class=V2Route,
)


def bad_request(message: str) -> HTTPException:
    """A 400 with the protocol's error body."""
    return HTTPException(status_code=400, detail=message)


@dataclass(frozen=True)
class Network:
    """One ONNX graph of the bundle as a v2 model: tensor dims without the batch axis."""

    name: str
    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]
    run: Callable[[F32], Awaitable[dict[str, F32]]]
    pixels: bool  # whether the input is an image in [0, 1]

    def metadata(self, version: str) -> ModelMetadata:
        """The v2 model metadata: -1 for the dynamic batch axis."""

        def tensors(dims: dict[str, tuple[int, ...]]) -> list[TensorMetadata]:
            return [
                TensorMetadata(name=name, datatype=DATATYPE, shape=[-1, *shape])
                for name, shape in dims.items()
            ]

        return ModelMetadata(
            name=self.name,
            versions=[version],
            platform=PLATFORM,
            inputs=tensors(self.inputs),
            outputs=tensors(self.outputs),
        )


def networks(runtime: Runtime) -> dict[str, Network]:
    """The v2 models a bundle serves, by name: the raw graphs, each through its batcher."""
    manifest = runtime.manifest
    image, d = manifest.input_shape, manifest.latent_dim

    async def encode(x: F32) -> dict[str, F32]:
        mu, logvar = await runtime.encoder(x)
        return {"mu": mu, "logvar": logvar}

    async def decode(z: F32) -> dict[str, F32]:
        (out,) = await runtime.decoder(z)
        return {manifest.decoder_output: out}

    encoder = Network(
        f"{manifest.name}-encoder", {"x": image}, {"mu": (d,), "logvar": (d,)}, encode, True
    )
    decoder = Network(
        f"{manifest.name}-decoder", {"z": (d,)}, {manifest.decoder_output: image}, decode, False
    )
    return {net.name: net for net in (encoder, decoder)}


async def get_network(request: Request, runtime: RuntimeDep, model_name: str) -> Network:
    """The v2 model named in the path, at the version in the path if any; 404 else."""
    served = networks(runtime)
    if model_name not in served:
        raise HTTPException(
            status_code=404,
            detail=f"model {model_name!r} not found; this server has {', '.join(served)}",
        )
    version = request.path_params.get("model_version")
    if version is not None and version != runtime.manifest.version:
        raise HTTPException(
            status_code=404,
            detail=f"model {model_name!r} has no version {version!r}; "
            f"it has {runtime.manifest.version!r}",
        )
    return served[model_name]


NetworkDep = Annotated[Network, Depends(get_network)]


async def _declare_version(
    model_version: Annotated[str, Path(description="the bundle version")],
) -> None:
    """Declares `{model_version}` for OpenAPI; get_network reads and checks it."""


def model_routes(method: str, suffix: str, **kwargs: Any) -> Callable[[Any], Any]:
    """Register an endpoint at `/models/{name}<suffix>` and at `.../versions/{version}<suffix>`."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        models.add_api_route(
            f"/models/{{model_name}}{suffix}", endpoint, methods=[method], **kwargs
        )
        models.add_api_route(
            f"/models/{{model_name}}/versions/{{model_version}}{suffix}",
            endpoint,
            methods=[method],
            dependencies=[Depends(_declare_version)],
            name=f"{endpoint.__name__}_version",
            **kwargs,
        )
        return endpoint

    return register


@server.get("")
async def server_metadata() -> ServerMetadata:
    """Server metadata: name, version and protocol extensions (none)."""
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=[])


@server.get("/health/live")
async def live() -> Live:
    """The server is alive (200)."""
    return Live(live=True)


@server.get(
    "/health/ready",
    response_model=Ready,
    responses={400: {"model": Ready, "description": "not ready, or shutting down"}},
)
async def ready(request: Request) -> Response:
    """Every model is loaded and warmed up: 200; 400 before and while draining (the spec's 4xx)."""
    state = request.app.state
    is_ready = state.runtime is not None and not getattr(state, "draining", False)
    return JSONResponse(Ready(ready=is_ready).model_dump(), status_code=200 if is_ready else 400)


@model_routes("GET", "")
async def model_metadata(network: NetworkDep, runtime: RuntimeDep) -> ModelMetadata:
    """Model metadata: versions, platform, and the inputs and outputs with their shapes."""
    return network.metadata(runtime.manifest.version)


@model_routes("GET", "/ready")
async def model_ready(network: NetworkDep) -> Ready:
    """The model is loaded and ready (200); 404 for an unknown model."""
    return Ready(ready=True)


def to_array(tensor: RequestInput, dims: tuple[int, ...], max_batch: int, pixels: bool) -> F32:
    """Check one input tensor against the model's and return it as float32 of its shape."""
    name = tensor.name
    if tensor.datatype != DATATYPE:
        raise bad_request(
            f"input {name!r} has datatype {tensor.datatype!r}; this model takes {DATATYPE}"
        )
    expected = [-1, *dims]
    if len(tensor.shape) != len(expected) or tuple(tensor.shape[1:]) != dims:
        raise bad_request(f"input {name!r} has shape {tensor.shape}; the model takes {expected}")
    batch = tensor.shape[0]
    if batch < 1:
        raise bad_request(f"input {name!r} has a batch of {batch}; send at least one row")
    if batch > max_batch:
        raise bad_request(
            f"input {name!r} has a batch of {batch}, over the limit of {max_batch} (VAE_MAX_ROWS)"
        )
    try:
        data = np.asarray(tensor.data)
    except (ValueError, RecursionError):
        raise bad_request(
            f"input {name!r}: data is ragged; send it flat or nested to the shape"
        ) from None
    if data.dtype.kind not in "iuf":
        raise bad_request(f"input {name!r}: data must hold only numbers")
    size = prod(tensor.shape)
    if data.ndim == 1 and data.size != size:
        raise bad_request(
            f"input {name!r} has {data.size} values; its shape {tensor.shape} needs {size}"
        )
    if data.ndim > 1 and list(data.shape) != tensor.shape:
        raise bad_request(
            f"input {name!r} has nested data of shape {list(data.shape)}; its shape is "
            f"{tensor.shape} (or send the data flat)"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        array = data.astype(np.float32).reshape(tensor.shape)
    if not np.isfinite(array).all():
        raise bad_request(f"input {name!r} has NaN, infinite or out-of-float32-range values")
    if pixels and (array.min() < 0.0 or array.max() > 1.0):
        raise bad_request(
            f"input {name!r} has values in [{array.min():g}, {array.max():g}]; pixel values must "
            "be in [0, 1] (divide 8-bit data by 255)"
        )
    return array


def select_outputs(body: InferenceRequest, network: Network) -> list[str]:
    """The requested output names, in request order; all of the model's when none are named."""
    if not body.outputs:
        return list(network.outputs)
    wanted = list(dict.fromkeys(output.name for output in body.outputs))
    for name in wanted:
        if name not in network.outputs:
            raise bad_request(
                f"model {network.name!r} has no output {name!r}; its outputs are "
                f"{', '.join(network.outputs)}"
            )
    return wanted


def _input(body: InferenceRequest, network: Network) -> RequestInput:
    (expected,) = network.inputs
    names = [tensor.name for tensor in body.inputs]
    if names != [expected]:
        raise bad_request(
            f"model {network.name!r} takes one input named {expected!r}; got {names or 'none'}"
        )
    return body.inputs[0]


@model_routes(
    "POST",
    "/infer",
    response_model=InferenceResponse,
    response_model_exclude_none=True,
    # the protocol's bodies are JSON whatever the headers say: tritonclient sends no Content-Type
    strict_content_type=False,
)
async def infer(
    body: InferenceRequest, network: NetworkDep, runtime: RuntimeDep, settings: SettingsDep
) -> Response:
    """Run the model on JSON tensors (FP32, data flat row-major or nested to the shape)."""
    tensor = _input(body, network)
    wanted = select_outputs(body, network)
    dims = network.inputs[tensor.name]
    rows = max(tensor.shape[0] if tensor.shape else 1, len(tensor.data) // max(1, prod(dims)))
    array = await off_loop(rows, to_array, tensor, dims, settings.max_rows, network.pixels)
    results = await network.run(array)
    response = await off_loop(rows, _respond, body, network, runtime, wanted, results)
    runtime.release_after(rows)  # the answer's floats and text, as the other endpoints do
    return response


def _respond(
    body: InferenceRequest,
    network: Network,
    runtime: Runtime,
    wanted: list[str],
    results: dict[str, F32],
) -> Response:
    """The protocol's response with the `wanted` outputs; 400 for outputs that are not finite."""
    answer: dict[str, Any] = {
        "model_name": network.name,
        "model_version": runtime.manifest.version,
    }
    if body.id is not None:
        answer["id"] = body.id
    # the JSON text in pieces, joined once: each piece holds the GIL a few milliseconds and the
    # event loop runs between them; written whole (or copied piece on piece), the 6.4 million
    # floats of an 8,192-row decoder answer held it for half a second (BENCHMARKS.md section 7)
    outputs = []
    for name in wanted:
        value = results[name]
        bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
        if bad.any():
            raise bad_request(
                f"output {name!r} is not finite for rows {np.flatnonzero(bad).tolist()}; "
                "send inputs of a sensible size"
            )
        meta = {"name": name, "shape": list(value.shape), "datatype": DATATYPE}
        flat = value.ravel()
        runs = [
            (json_bytes(flat[start : start + FLOATS_PER_PIECE].tolist())[1:-1],)
            for start in range(0, flat.size, FLOATS_PER_PIECE)
        ]
        outputs.append([json_bytes(meta)[:-1], b',"data":', *json_array(runs), b"}"])
    pieces = [json_bytes(answer)[:-1], b',"outputs":', *json_array(outputs), b"}"]
    return Response(b"".join(pieces), media_type="application/json")


# both carry the /v2 prefix themselves: FastAPI gives a nested router's route, without its outer
# router's prefix, to the request (scope["route"]), and the metrics label it by its path
router = APIRouter()
router.include_router(server)
router.include_router(models)
