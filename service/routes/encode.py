"""POST /encode: images -> the approximate posterior q(z|x)."""

from typing import Annotated

from fastapi import APIRouter, Query, Request

from service.deps import IMAGES_OPENAPI, ServedDep, read_images
from service.inference import F32, MAX_SEED, draw_eps, fresh_seed
from service.objective import reparameterize
from service.schemas import EncodePublic, LatentPublic

router = APIRouter(tags=["latents"])


@router.post("/encode", openapi_extra=IMAGES_OPENAPI)
async def encode(
    request: Request,
    served: ServedDep,
    sample: Annotated[bool, Query(description="also draw z = mu + sigma * eps")] = False,
    seed: Annotated[
        int | None, Query(ge=0, le=MAX_SEED, description="seed of eps; fresh when omitted")
    ] = None,
) -> EncodePublic:
    """Encode images to mu and logvar of q(z|x), and a reparameterised draw z with sample=true."""
    model, x = served.model, await read_images(request, served)
    used_seed = (fresh_seed() if seed is None else seed) if sample else None

    def respond(mu: F32, logvar: F32) -> EncodePublic:
        z = None
        if used_seed is not None:
            z = reparameterize(mu, logvar, draw_eps(used_seed, mu.shape)).tolist()
        results = [
            LatentPublic(mu=row, logvar=lv, z=None if z is None else z[i])
            for i, (row, lv) in enumerate(zip(mu.tolist(), logvar.tolist(), strict=True))
        ]
        return EncodePublic(latent_dim=mu.shape[1], seed=used_seed, results=results)

    if model.gathers(len(x)):  # small: one gathered encoder call, the response on the event loop
        return respond(*await model.encode_gathered(x))
    return await model.run(len(x), lambda m: respond(*m.encode(x)))
