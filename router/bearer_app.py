"""What the head and the login-node gateway share as HTTP apps: a route table, a bearer key on
every route but the open ones (/health), errors as OpenAI's error object (counted by status), and
/metrics in Prometheus' text format. Each adds its own routes (router/http_app.py,
gateway/server.py)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Protocol

from slurmserve.router.http_server import Request, Response
from slurmserve.router.openai_api import APIError

JSON = [(b"content-type", b"application/json")]
PROMETHEUS_TEXT = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]

Handler = Callable[[Request, Response], Awaitable[None]]


class AppMetrics(Protocol):
    http_errors: object       # a prometheus_client Counter labelled by status

    def render(self) -> bytes: ...


class BearerApp:
    open_paths = frozenset({"/health"})     # answered without the key

    def __init__(self, api_key: str, metrics: AppMetrics):
        self._api_key = api_key.encode()
        self.metrics = metrics
        self.routes: dict[tuple[str, str], Handler] = {("GET", "/metrics"): self.prometheus}

    async def __call__(self, request: Request, response: Response) -> None:
        handler = self.routes.get((request.method, request.path))
        try:
            if handler is None:
                if any(p == request.path for _, p in self.routes):
                    raise APIError(405, f"method {request.method} is not allowed on {request.path}")
                raise APIError(404, f"no route for {request.method} {request.path}", code="not_found")
            if request.path not in self.open_paths:
                self._authorize(request)
            await handler(request, response)
        except APIError as e:
            self.metrics.http_errors.labels(e.status).inc()
            response.send(e.status, e.body(), JSON + [(k.encode(), v.encode()) for k, v in e.headers.items()])

    def _authorize(self, request: Request) -> None:
        value = request.header(b"authorization")
        if value is not None:
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._api_key):
                return
        raise APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")

    async def prometheus(self, request: Request, response: Response) -> None:
        response.send(200, self.metrics.render(), PROMETHEUS_TEXT)
