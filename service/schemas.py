"""Request and response bodies, named for their role."""

import base64
import binascii
import functools
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from service.bundle import Manifest, ScoreName
from service.errors import json_array, json_bytes

# A 28x28 black PNG, for the OpenAPI examples.
BLACK_28X28_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAEElEQVR4nGNgGAWjYBQQAwADLAABPwpG8wAAAABJ"
    "RU5ErkJggg=="
)
F32 = np.ndarray[Any, np.dtype[np.float32]]
# strict: "0" and true are not numbers (JSON ints still are)
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]
OutputFormat = Literal["base64", "arrays", "grid"]
Score = ScoreName
JSON_MEDIA = "application/json"


def _base64_image(value: object) -> bytes:
    """Base64 text (optionally a `data:image/...;base64,` URL) -> bytes."""
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("a data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None


def _pixel_array(value: object) -> F32:
    """Nested lists `(H, W)` or `(C, H, W)` of numbers in [0, 1] -> float32 `(C, H, W)`."""
    if not isinstance(value, list):
        raise ValueError("must be a nested list of numbers")
    try:
        array = np.asarray(value)
    except (ValueError, RecursionError):
        raise ValueError("is ragged or too deep: expected (H, W) or (C, H, W) lists") from None
    if array.dtype.kind not in "biuf":
        raise ValueError("must contain only numbers")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] not in (1, 3) or 0 in array.shape:
        raise ValueError(
            f"has shape {list(np.shape(value))}; expected (height, width) or (channels, height, "
            "width) with 1 or 3 channels"
        )
    if not np.isfinite(array).all():
        raise ValueError("contains NaN or infinity")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"has values in [{low:g}, {high:g}]; pixel values must be in [0, 1] "
            "(divide 8-bit data by 255)"
        )
    return array.astype(np.float32)


Base64Image = Annotated[
    bytes,
    PlainValidator(_base64_image),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]
PixelArray = Annotated[
    F32,
    PlainValidator(_pixel_array),
    WithJsonSchema({"type": "array", "items": {"type": "array"}}),
]


# an unknown key is echoed in the 422 up to this many characters, and up to this many keys
MAX_KEY_SHOWN = 40
MAX_KEYS_SHOWN = 5


class RequestBody(BaseModel):
    """A JSON request body whose unknown keys are refused with a list of the accepted ones."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            accepted = [field.alias or name for name, field in cls.model_fields.items()]
            unknown = [key for key in data if key not in accepted]
            if unknown:
                named = ", ".join(
                    repr(str(key)[:MAX_KEY_SHOWN]) for key in unknown[:MAX_KEYS_SHOWN]
                )
                extra = len(unknown) - MAX_KEYS_SHOWN
                more = f" and {extra} more" if extra > 0 else ""
                raise PydanticCustomError(
                    "extra_forbidden",
                    "unknown key(s) {unknown}{more}; this body accepts {accepted}",
                    {"unknown": named, "more": more, "accepted": ", ".join(map(repr, accepted))},
                )
        return data


IMAGE_FIELDS = ("images", "pixels")


def _one_of_images(schema: dict[str, Any]) -> None:
    """The JSON schema says what the validators check: exactly one of the fields, never null."""
    for name in IMAGE_FIELDS:
        field = schema["properties"][name]
        (array,) = [option for option in field.pop("anyOf") if option.get("type") == "array"]
        field.update(array)
        field.pop("default", None)
    schema["oneOf"] = [{"required": [name]} for name in IMAGE_FIELDS]
    schema["examples"] = [{"images": [BLACK_28X28_PNG]}, {"pixels": [[[0.0, 0.5], [1.0, 0.25]]]}]


class ImagesRequest(RequestBody):
    """A JSON body of images: base64-encoded files or nested arrays of pixel values in [0, 1]."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_of_images)

    images: list[Base64Image] | None = Field(
        default=None, min_length=1, description="base64 image files (PNG, JPEG, ...), or data: URLs"
    )
    pixels: list[PixelArray] | None = Field(
        default=None,
        min_length=1,
        description="per image (H, W) or (C, H, W) nested lists in [0, 1]",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(name, ...) is None for name in IMAGE_FIELDS):
            raise ValueError("leave out the field you do not use instead of sending null")
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImagesRequest":
        if (self.images is None) == (self.pixels is None):
            raise ValueError("give exactly one of 'images' (base64 files) or 'pixels' (arrays)")
        return self


class DecodeRequest(RequestBody):
    """Latent vectors to decode, `B x latent_dim`."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"z": [[0.0] * 8, [1.0, -1.0] * 4]}]}
    )

    z: list[list[FiniteFloat]] = Field(min_length=1, description="B rows of latent_dim numbers")


class LatentPublic(BaseModel):
    """The approximate posterior q(z|x) of one image, and a draw from it when asked."""

    mu: list[float]
    logvar: list[float]
    z: list[float] | None = Field(
        default=None, description="mu + exp(0.5 logvar) * eps when sample=true"
    )


class EncodePublic(BaseModel):
    """Posterior parameters for each image, in request order."""

    latent_dim: int
    seed: int | None = Field(default=None, description="the seed of eps when sample=true")
    results: list[LatentPublic]


class ImagesPublic(BaseModel):
    """Decoded images: base64 PNGs, or the raw mean / probability arrays."""

    channels: int
    height: int
    width: int
    images: list[str] | None = Field(
        default=None, description="base64 PNG per image (format=base64)"
    )
    arrays: list[list[list[list[float]]]] | None = Field(
        default=None, description="(B, C, H, W) values (format=arrays)"
    )
    kind: Literal["probabilities", "mean"] = Field(
        description="Bernoulli: pixel probabilities; Gaussian: the mean (unclipped in arrays)"
    )


class ReconstructPublic(ImagesPublic):
    """Reconstructions, and with `inputs=true` the images as the model saw them."""

    inputs: list[str] | None = Field(
        default=None,
        description="base64 PNG per input image after conversion to the model's channels and "
        "size: what the encoder was given (inputs=true)",
    )


class SamplePublic(ImagesPublic):
    """Images decoded from z drawn from the prior, its spread scaled by temperature."""

    seed: int
    temperature: float
    z: list[list[float]]


class ElboResult(BaseModel):
    """Bounds on log p(x) and the anomaly verdict for one image, in nats."""

    elbo: float
    reconstruction: float = Field(description="E_q log p(x|z), the mean over `samples` draws")
    kl: float = Field(description="KL(q(z|x) || p(z)), closed form")
    samples: int
    iwae: float | None = Field(
        default=None, description="IWAE bound with k samples, when k was given"
    )
    k: int | None = None
    anomaly_score: float
    percentile: float | None = Field(
        default=None,
        description="of anomaly_score among the calibration set; null without calibration",
    )
    is_anomaly: bool | None = Field(
        default=None, description="anomaly_score > threshold; null without one"
    )
    anomaly_map: list[list[float]] | str | None = Field(
        default=None,
        description="with map=array, the (H, W) per-pixel terms of blur_recon_energy (they sum "
        "to that score); with map=png, a base64 PNG heat map of them over the image",
    )


def json_response(model: type[BaseModel], payload: dict[str, Any]) -> Response:
    """`payload` validated as `model` and serialised, both by pydantic's compiled core, as a ready
    JSON response: made in the worker thread that computed it, it leaves the event loop nothing
    to do but send (FastAPI returns a Response as it is). Routes that use it still declare
    `response_model=model`, so the OpenAPI schema is unchanged."""
    adapter = _adapter(model)
    return Response(adapter.dump_json(adapter.validate_python(payload)), media_type=JSON_MEDIA)


def json_response_with_list(
    model: type[BaseModel], payload: dict[str, Any], name: str, items: Iterable[bytes]
) -> Response:
    """`json_response`, with the list field `name` given as its items' JSON texts, made one at a
    time and joined once: the event loop runs between them, where 8,192 images' arrays made and
    written in one call held the GIL for most of a second (BENCHMARKS.md section 7)."""
    adapter = _adapter(model)
    head = adapter.dump_json(adapter.validate_python({**payload, name: []}), exclude={name})
    field = [head[:-1], b"," if len(head) > 2 else b"", b'"', name.encode(), b'":']
    elements = ((item,) for item in items)
    return Response(b"".join([*field, *json_array(elements), b"}"]), media_type=JSON_MEDIA)


def array_items(images: np.ndarray) -> Iterator[bytes]:
    """Each image of `images (B, ...)` as a JSON nested list (our own floats: no validation)."""
    for image in images:
        yield json_bytes(image.tolist())


def model_items(model: type[BaseModel], rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """Each row validated as `model` and written as JSON."""
    adapter = _adapter(model)
    for row in rows:
        yield adapter.dump_json(adapter.validate_python(row))


@functools.cache
def _adapter(model: type[BaseModel]) -> TypeAdapter[Any]:
    return TypeAdapter(model)


class ElboPublic(BaseModel):
    """Per-image ELBO results plus how the anomaly score was made."""

    seed: int
    score: Score
    score_draws: int = Field(
        description="samples (neg_elbo) or k (neg_iwae) behind the score; 0 for the scores of "
        "the reconstruction (recon_error, blur_recon_rel, blur_recon_contrast, blur_recon_energy)"
    )
    threshold: float | None
    threshold_source: Literal["request", "settings", "manifest"] | None
    results: list[ElboResult]


class ModelPublic(Manifest):
    """The bundle's manifest plus the runtime serving it."""

    providers: list[str]


class StatusPublic(BaseModel):
    """Liveness / readiness."""

    status: Literal["ok", "ready"]
