"""Safe default: an app whose HTTP port faces the network starts only with an API key.

Serve's proxies listen on one host for the whole cluster (``http_options.host``): loopback
for ``serve run`` unless told otherwise, but 0.0.0.0 for a config deployed with ``serve deploy``
or KubeRay when the config names none. Beyond loopback, anyone who can reach the port could
use the model, so the app is refused unless it has a key or says ``allow_unauthenticated``
(then a warning is logged).
"""

from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger(__name__)


def serve_http_host() -> str | None:
    """The host Serve's proxies listen on: the running Serve instance's, else what
    ``serve.start`` would use (None: proxies are disabled)."""
    import ray
    from ray.serve.config import HTTPOptions

    if ray.is_initialized():
        from ray.serve.context import _get_global_client  # the only way to the controller's HTTP config

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is not None:
            return client.http_config.host
    return HTTPOptions().host


def is_loopback(host: str | None) -> bool:
    """True for hosts only this machine reaches (None: no HTTP proxy at all)."""
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: assume it resolves to a reachable interface


def check_exposure(host: str | None, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Raise if an app without a key would listen beyond loopback, unless opted out (logged)."""
    if api_key or is_loopback(host):
        return
    if not allow_unauthenticated:
        raise ValueError(
            f"Serve listens on {host!r} (beyond loopback) and this app has no API key: set api_key (or "
            "SDSAT_API_KEY in the environment of the Ray nodes), bind http_options.host to 127.0.0.1, or "
            "set allow_unauthenticated=true to serve without a key on purpose"
        )
    log.warning("serving on %s WITHOUT an API key (allow_unauthenticated=true): anyone who reaches the port "
                "can use the model", host)
