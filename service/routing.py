"""Model endpoints: `ModelRoute`, and `ModelEndpoints`, which sends their requests straight to them.

A model endpoint is `async def endpoint(served, request[, query]) -> Response`: the caller
checked and the runtime serving now (`get_served`), the request, and its query string read into
the pydantic model `query` is annotated with (`Annotated[Model, Query()]`). The endpoint reads the
body itself (service/parsing.py) and returns a ready response. FastAPI documents the route from
the same signature; per request, neither its dependency solving and response validation nor its
router and exception middleware run: on a 1-PNG /encode they were over a third of the server's
time (BENCHMARKS.md section 3).
"""

import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, get_args, get_type_hints

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from service.deps import get_served
from service.errors import path_below_root
from service.parsing import NoQuery, read_query

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
Endpoint = Callable[..., Awaitable[Response]]


class ModelRoute(APIRoute):
    """The route of a model endpoint; its handler is `get_served`, `read_query`, the endpoint."""

    def get_route_handler(self) -> Handler:
        endpoint: Endpoint = self.endpoint
        names = list(inspect.signature(endpoint).parameters)
        if names not in (["served", "request"], ["served", "request", "query"]):
            raise TypeError(f"{self.path}: a ModelRoute endpoint takes (served, request[, query])")
        takes_query = len(names) == 3
        model: type[BaseModel] = (
            get_args(get_type_hints(endpoint, include_extras=True)["query"])[0]
            if takes_query
            else NoQuery
        )

        async def handler(request: Request) -> Response:
            served = await get_served(request)
            query = read_query(model, request)  # a 422 for parameters the endpoint does not take
            if takes_query:
                return await endpoint(served, request, query)
            return await endpoint(served, request)

        return handler


class ModelEndpoints:
    """Middleware that hands each request for a model endpoint to its ModelRoute's handler, and
    everything else to the app; exceptions become responses through the app's own handlers."""

    def __init__(self, app: ASGIApp, routes: list[ModelRoute]) -> None:
        self.app = app
        self.routes = {
            (method, route.path): (route, route.get_route_handler())
            for route in routes
            for method in route.methods or ()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.routes.get(_method_and_path(scope)) if scope["type"] == "http" else None
        if found is None:  # not a model endpoint, or not its exact path (FastAPI redirects)
            await self.app(scope, receive, send)
            return
        route, handler = found
        scope["route"] = route
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except Exception as exc:
            on_error = _handler_for(scope["app"].exception_handlers, exc)
            if on_error is None:
                raise
            response = await on_error(request, exc)
        await response(scope, receive, send)


def _method_and_path(scope: Scope) -> tuple[str, str]:
    """The request's method and path below the app's root path, as Starlette's router sees it."""
    return scope["method"], path_below_root(scope)


def _handler_for(handlers: dict[Any, Any], exc: Exception) -> Any:
    """The app's handler for `exc`: the one registered for its nearest class (as Starlette)."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
