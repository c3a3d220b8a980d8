"""Optional API key: with one configured, every route but ``GET /health`` needs ``Authorization: Bearer <key>``.

The key lives in this module (one Router replica per process): Serve ships the ingress app to
replicas as a copy, so per-app state cannot be kept on ``app.state`` from the Router's __init__.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from deployments.errors import APIError

_api_key: str | None = None


def configure(api_key: str | None) -> None:
    global _api_key
    _api_key = api_key or None


HEALTH = "/health"  # the one route that needs no key (load balancers and probes call it)


def exempt(request: Request) -> bool:
    """Exactly the health route, below the app's route prefix (Serve's ``root_path``)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return request.method in ("GET", "HEAD") and path == HEALTH


async def authenticate(request: Request, call_next):
    """HTTP middleware: checks the key before the body is even read."""
    if _api_key and not exempt(request):
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), _api_key.encode()):
            reason = "missing" if not header else "invalid"
            message = f"{reason} API key: send the header 'Authorization: Bearer <key>'"
            return APIError(401, message, None, "invalid_api_key").response()
    return await call_next(request)
