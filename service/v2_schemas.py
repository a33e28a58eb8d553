"""Bodies of the Open Inference Protocol (KServe v2) REST API.

The spec: https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from service.schemas import RequestBody

Parameters = dict[str, StrictStr | StrictInt | StrictFloat | StrictBool]


class ServerMetadata(BaseModel):
    """`GET /v2`."""

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    """One input or output of a model; -1 marks a variable-size dimension."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """`GET /v2/models/{name}`."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(RequestBody):
    """One input tensor; `data` is row-major, flat or nested to `shape`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int] = Field(max_length=16)
    datatype: str
    parameters: Parameters | None = None
    data: list[Any]


class RequestOutput(RequestBody):
    """An output the client wants back."""

    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: Parameters | None = None


class InferenceRequest(RequestBody):
    """`POST /v2/models/{name}/infer`; without `outputs`, every output is returned."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {"name": "z", "shape": [1, 2], "datatype": "FP32", "data": [0.0, 0.5]}
                    ],
                }
            ]
        },
    )

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    """One output tensor, `data` flat in row-major order."""

    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferenceResponse(BaseModel):
    """The answer to an inference request; `id` echoes the request's."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class Live(BaseModel):
    """`GET /v2/health/live`: the status code is the answer; KServe's client reads the body."""

    live: bool


class Ready(BaseModel):
    """`GET /v2/health/ready` and `.../models/{name}/ready`: 200 ready, 400 not (the spec: 4xx)."""

    ready: bool


class ErrorV2(BaseModel):
    """The protocol's error object."""

    error: str
