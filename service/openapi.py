"""The served OpenAPI document, made to tell the truth about limits, errors and authentication.

FastAPI documents what it can see in the signatures; the limits set by VAE_* settings, the key a
deployment requires and the errors raised below the routes are added here from the settings and
from each route's dependencies, so that clients and fuzzers (schemathesis) can trust it.
"""

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, routing
from fastapi.dependencies.models import Dependant

from service.deps import get_runtime, get_served, require_api_key
from service.routes.admin import require_admin
from service.routes.decode import Z_MAX
from service.schemas import DecodeRequest
from service.settings import Settings

# query parameters whose value alone counts in the per-request row budget: at most VAE_MAX_ROWS
# (with more than one image, /elbo's samples and k meet the budget sooner: a 422 names it)
QUERY_LIMITS: dict[str, tuple[str, str]] = {
    name: ("max_rows", "VAE_MAX_ROWS") for name in ("n", "steps", "samples", "k")
}
SCHEMES = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "BearerAuth": {"type": "http", "scheme": "bearer"},
}
BODY_ERRORS = {
    "400": "malformed body (a truncated or broken multipart body, or a body FastAPI cannot read)",
    "413": "body over VAE_MAX_UPLOAD_BYTES (JSON: 1 MiB), or images over VAE_MAX_PIXELS",
    "415": "unsupported Content-Type",
}
MODEL_ERRORS = {"503": "model not loaded yet, or the batch queue is full (Retry-After)"}
KEY_ERRORS = {"401": "missing or invalid API key (VAE_API_KEY is set)"}
IMAGES = ("images", "pixels")  # the JSON body's lists of images


def _calls(dependant: Dependant) -> set[Callable[..., Any]]:
    """Every dependency a route runs, nested ones included."""
    calls = {dependant.call} if dependant.call is not None else set()
    for sub in dependant.dependencies:
        calls |= _calls(sub)
    return calls


def _routes(app: FastAPI) -> list[Any]:
    """The app's routes as OpenAPI sees them, included routers' ones with their prefixes."""
    contexts = getattr(routing, "iter_route_contexts", None)  # FastAPI >= 0.16x nests routers
    routes = list(contexts(app.routes)) if contexts is not None else app.routes
    return [route for route in routes if getattr(route, "dependant", None) is not None]


def _add_responses(operation: dict[str, Any], errors: dict[str, str]) -> None:
    responses = operation.setdefault("responses", {})
    for status, description in errors.items():
        responses.setdefault(status, {"description": description})


def _arrays(schema: dict[str, Any], names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The array schemas of properties `names` (the array branch of an `X | None`)."""
    found = []
    for name in names:
        prop = schema.get("properties", {}).get(name, {})
        found += [option for option in prop.get("anyOf", [prop]) if option.get("type") == "array"]
    return found


def _bound_images(operation: dict[str, Any], max_images: int) -> None:
    """At least one image and at most VAE_MAX_IMAGES in an image endpoint's request body."""
    body = operation["requestBody"] = copy.deepcopy(operation["requestBody"])  # may be shared
    for media, names in (("multipart/form-data", ("images",)), ("application/json", IMAGES)):
        schema = body["content"].get(media, {}).get("schema", {})
        for array in _arrays(schema, names):
            array.setdefault("minItems", 1)
            array.setdefault("maxItems", max_images)


def document(
    app: FastAPI, schema: dict[str, Any], settings: Settings, latent_dim: int | None
) -> dict[str, Any]:
    """`schema` (FastAPI's) with the settings' limits, the errors and the security scheme;
    with `latent_dim` (a model loaded), the width of /decode's z rows."""
    for route in _routes(app):
        if not route.include_in_schema:
            continue
        calls = _calls(route.dependant)
        needs_key = settings.api_key is not None and bool(
            calls & {require_api_key, get_served, require_admin}
        )
        for method in route.methods:
            operation = schema["paths"].get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "query" and parameter["name"] in QUERY_LIMITS:
                    field, env = QUERY_LIMITS[parameter["name"]]
                    target = parameter["schema"]
                    options = target.get("anyOf", [target])  # `int | None`: the int branch
                    for option in options:
                        if option.get("type") == "integer":
                            option["maximum"] = getattr(settings, field)
                    parameter.setdefault("description", f"at most {env}")
            if "requestBody" in operation:
                _add_responses(operation, BODY_ERRORS)
                if "multipart/form-data" in operation["requestBody"].get("content", {}):
                    _bound_images(operation, settings.max_rows)
            if calls & {get_runtime, get_served}:
                _add_responses(operation, MODEL_ERRORS)
            if needs_key:
                _add_responses(operation, KEY_ERRORS)
                operation["security"] = [{name: []} for name in SCHEMES]
    components = schema.setdefault("components", {})
    if settings.api_key is not None:
        components["securitySchemes"] = SCHEMES
    # /decode reads its body itself (service/routes/decode.py) and refers to this schema
    decode = DecodeRequest.model_json_schema()
    components.setdefault("schemas", {})["DecodeRequest"] = decode
    z = decode["properties"]["z"]
    z["maxItems"] = settings.max_rows
    z["items"]["items"].update(minimum=-Z_MAX, maximum=Z_MAX)
    if latent_dim is not None:
        z["items"].update(minItems=latent_dim, maxItems=latent_dim)
    return schema
