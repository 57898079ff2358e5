"""The container health probe: GET /v1/health on the configured port, over HTTP or HTTPS.

Kept apart from the command line so that Docker's HEALTHCHECK imports only the config and
the standard library: it runs every few seconds, also while the agent imports torch.
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from agent.config import load_config
from agent.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/fedsite/config.yaml")


def probe_health(config_path: str | Path = DEFAULT_CONFIG, *, timeout: float = 5.0) -> int:
    """Container health check: GET /v1/health on the configured port over HTTP or HTTPS.
    Returns a process exit status (0 healthy). Loopback only, so the server certificate is
    not verified (its names are the site's public ones) and no credential is sent."""
    try:
        cfg = load_config(config_path, check_paths=False)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    host = cfg.api.host
    if host in ("0.0.0.0", ""):  # noqa: S104 - the wildcard is what we translate away from
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if cfg.api.tls is not None else "http"
    url = f"{scheme}://{host}:{cfg.api.port}/v1/health"
    context = None
    if scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:  # noqa: S310 - fixed scheme
            body = json.loads(resp.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if body.get("status") != "ok":
        print(f"{url}: unhealthy: {body}", file=sys.stderr)
        return 1
    return 0
