"""The services one worker holds, built once by `create_app` and shared by every request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the services' modules are imported by `create_app` when they are built, not by every reader
    from app.auth import Authenticator
    from app.cache.service import CacheService
    from app.config import Settings
    from app.keys.service import KeyService
    from app.proxy.body import PendingBodies
    from app.proxy.context import Network
    from app.ratelimit.admission import Admission
    from app.redis_client import RedisClient
    from app.spend.service import Spend
    from app.upstream.client import UpstreamClient
    from app.upstream.fallbacks import FallbackRules


@dataclass
class Gateway:
    settings: Settings
    redis: RedisClient
    auth: Authenticator
    upstream: UpstreamClient
    spend: Spend  # prices, the per-request accounting and the spend rollups
    pending_bodies: PendingBodies  # request bodies still arriving, per tenant
    cache: CacheService | None = None  # None when caching is off
    limiter: Admission | None = None  # None when no tenant has (or may get) a limit
    trusted_networks: tuple[Network, ...] = ()
    fallbacks: FallbackRules | None = None  # None when no chain is configured anywhere
    keys: KeyService | None = None  # run-time keys; None when authentication is off
