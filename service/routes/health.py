"""Liveness, readiness and Prometheus metrics: open without an API key, for orchestrators."""

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.metrics import Metrics
from service.schemas import StatusPublic

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> StatusPublic:
    """The process is alive."""
    return StatusPublic(status="ok")


@router.get(
    "/readyz",
    responses={503: {"description": "bundle not loaded or warmed up, or shutting down"}},
)
async def readyz(request: Request) -> StatusPublic:
    """The bundle is loaded and a warm-up inference has run; 503 before and while shutting down."""
    if request.app.state.runtime is None:
        raise HTTPException(status_code=503, detail="not ready: the model bundle is not loaded")
    if request.app.state.draining:
        raise HTTPException(status_code=503, detail="not ready: shutting down")
    return StatusPublic(status="ready")


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latency, inference time and batch sizes."""
    registry: Metrics = request.app.state.metrics
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
