"""GET /model: the served bundle's manifest."""

import re
from typing import Any

from fastapi import APIRouter

from service.deps import ServedDep
from service.schemas import ModelPublic

router = APIRouter(tags=["model"])

# a token holding a '/' and no scheme: a file path written at training time, which says nothing to
# a client and shows the layout of the machine that trained the model
PATH_TOKEN = re.compile(r"(?<![\w:/.~-])[\w.~-]*/[\w./~-]*")


def without_paths(value: Any) -> Any:
    """`value` (a manifest's JSON) with each file path in its strings cut to the last name."""
    if isinstance(value, str):
        return PATH_TOKEN.sub(lambda match: match.group().rstrip("/").rpartition("/")[2], value)
    if isinstance(value, dict):
        return {key: without_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_paths(item) for item in value]
    return value


@router.get("/model")
async def model_info(served: ServedDep) -> ModelPublic:
    """The manifest (file paths cut to their last name): image shape, latent dim, likelihood,
    version, metrics and calibration."""
    runtime = served.runtime
    return ModelPublic(
        **without_paths(runtime.manifest.model_dump()), providers=runtime.bundle.providers
    )
