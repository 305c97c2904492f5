"""The services one worker holds, built once by `create_app` and shared by every request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.auth import Authenticator
from app.config import Settings
from app.upstream.client import UpstreamClient


@dataclass
class Gateway:
    settings: Settings
    redis: Any
    auth: Authenticator
    upstream: UpstreamClient
    cache: Any = None  # app.cache.service.CacheService, or None when caching is off
    limiter: Any = None  # app.proxy.limits.Admission, or None when no limit is configured
    trusted_networks: tuple[Any, ...] = ()
    pending_bodies: Any = None  # app.proxy.body.PendingBodies: request bodies still arriving, per tenant
    keys: Any = None  # app.keys.service.KeyService (run-time keys), or None when authentication is off
