"""POST /encode: images -> the approximate posterior q(z|x)."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field, model_validator

from service.deps import ServedDep
from service.objective import reparameterize
from service.parsing import IMAGES_OPENAPI, read_images
from service.routing import ModelRoute
from service.runtime import F32, MAX_SEED, draw_eps, fresh_seed, off_loop
from service.schemas import EncodePublic, json_response

router = APIRouter(tags=["latents"], route_class=ModelRoute)


class EncodeQuery(BaseModel):
    sample: bool = Field(default=False, description="also draw z = mu + sigma * eps")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="seed of eps (with sample=true); fresh when omitted",
    )

    @model_validator(mode="after")
    def _seed_needs_sample(self) -> "EncodeQuery":
        if self.seed is not None and not self.sample:
            raise ValueError("seed draws z, which only sample=true does: add sample=true")
        return self


@router.post("/encode", response_model=EncodePublic, openapi_extra=IMAGES_OPENAPI)
async def encode(
    served: ServedDep, request: Request, query: Annotated[EncodeQuery, Query()]
) -> Response:
    """Encode images to mu and logvar of q(z|x), and a reparameterised draw z with sample=true."""
    x = await read_images(request, served)
    mu, logvar = await served.runtime.encode(x)
    seed = (fresh_seed() if query.seed is None else query.seed) if query.sample else None
    return await off_loop(len(mu), encode_public, mu, logvar, seed)


def encode_public(mu: F32, logvar: F32, seed: int | None) -> Response:
    """The response: mu and logvar per image, and z drawn with `seed` when there is one; made
    by pydantic's compiled core in one pass (json_response)."""
    z = None if seed is None else reparameterize(mu, logvar, draw_eps(seed, mu.shape)).tolist()
    results = [
        {"mu": row, "logvar": lv, "z": None if z is None else z[i]}
        for i, (row, lv) in enumerate(zip(mu.tolist(), logvar.tolist(), strict=True))
    ]
    return json_response(
        EncodePublic, {"latent_dim": mu.shape[1], "seed": seed, "results": results}
    )
