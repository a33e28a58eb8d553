"""Turn decoded image batches into the response a client asked for."""

import base64
from typing import Any

import numpy as np
from fastapi import HTTPException, Request, Response
from pydantic import BaseModel, Field

from service.imaging import F32, grid_png, to_png
from service.schemas import (
    ImagesPublic,
    OutputFormat,
    array_items,
    json_response,
    json_response_with_list,
)

PNG = "image/png"
JSON = "application/json"
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {PNG: {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON by default; one PNG grid with `Accept: image/png` or format=grid.",
    },
    406: {"description": "Accept names neither application/json nor image/png"},
}


class ImageQuery(BaseModel):
    """The query string of an endpoint that answers with images."""

    output: OutputFormat | None = Field(
        default=None,
        alias="format",
        description="base64: PNG per image in JSON (default); arrays: raw mean/probabilities; "
        "grid: one PNG (also chosen by `Accept: image/png`)",
    )


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    """`Accept` as (media range, q) pairs; malformed entries are skipped, a bad q counts as 1."""
    ranges = []
    for item in accept.split(","):
        name, *params = (part.strip() for part in item.split(";"))
        if "/" not in name:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 1.0
        ranges.append((name.lower(), q))
    return ranges


def _quality(ranges: list[tuple[str, float]], media: str) -> float:
    """The q-value for `media`: the most specific matching range wins (RFC 9110)."""
    rank = {media: 2, f"{media.split('/')[0]}/*": 1, "*/*": 0}
    matches = sorted((rank[name], q) for name, q in ranges if name in rank)
    return matches[-1][1] if matches else 0.0


def choose_format(requested: OutputFormat | None, accept: str | None) -> OutputFormat:
    """An explicit `format` wins; else `Accept` picks a PNG grid or JSON (the default)."""
    if requested is not None:
        return requested
    ranges = _media_ranges(accept or "")
    if not ranges:
        return "base64"
    json_q, png_q = _quality(ranges, JSON), _quality(ranges, PNG)
    if json_q <= 0 and png_q <= 0:
        raise HTTPException(
            status_code=406,
            detail=f"cannot answer Accept: {accept}; this endpoint returns {JSON} or {PNG}",
        )
    return "grid" if png_q > json_q else "base64"


def png_base64(images: F32) -> list[str]:
    """`(B, C, H, W)` in [0, 1] -> one base64 PNG per image."""
    return [base64.b64encode(to_png(image)).decode("ascii") for image in images]


def response_format(request: Request, query: ImageQuery) -> OutputFormat:
    """The format asked for, by `format` or `Accept`; 406 before any work when none fits."""
    return choose_format(query.output, request.headers.get("accept"))


def render_images(
    mean: F32,
    fmt: OutputFormat,
    likelihood: str,
    *,
    public: type[ImagesPublic] = ImagesPublic,
    headers: dict[str, str] | None = None,
    columns: int | None = None,
    **extra: Any,
) -> Response:
    """`mean (B, C, H, W)` -> base64 PNGs, raw arrays, or one PNG grid (CPU-bound: routes run it
    through `off_loop`).

    `public` and `extra` extend the JSON body (arrays as lists); `headers` go on the PNG grid,
    which has no body to carry them; `columns` lays the grid out (default: near-square).
    """
    _, c, h, w = mean.shape
    kind = "probabilities" if likelihood == "bernoulli" else "mean"
    if fmt == "grid":
        return Response(content=grid_png(mean, columns=columns), media_type=PNG, headers=headers)
    fields: dict[str, Any] = {"channels": c, "height": h, "width": w, "kind": kind}
    fields |= {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in extra.items()}
    if fmt == "arrays":
        return json_response_with_list(public, fields, "arrays", array_items(mean))
    return json_response(public, {"images": png_base64(mean), **fields})
