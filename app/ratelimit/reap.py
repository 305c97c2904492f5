"""`python -m app.ratelimit.reap PID`: release the concurrency slots a dead worker still holds.

gunicorn's master runs this from `child_exit` when a worker exits (a SIGKILL, the OOM killer, a graceful
timeout run out): the master itself must not import redis-py (it would import `ssl` before the workers' gevent
patches it), so the work happens in a short-lived process of its own. Each slot carries its worker's name
(`worker_owner`), and each worker notes which concurrency sets it holds slots in, so nothing is scanned.
If Redis cannot be reached for a while, the slots' lease (15 s) frees them anyway.
"""

from __future__ import annotations

import logging
import sys
import time

from app.config import ConfigError, Settings
from app.observability.logging import configure_logging
from app.ratelimit.limiter import RateLimiter, RateLimiterError, worker_owner
from app.redis_client import build_redis

log = logging.getLogger("app.ratelimit.reap")

ATTEMPTS = 5
RETRY_SECONDS = 1.0


def reap(settings: Settings, pid: int) -> int:
    """Release worker `pid`'s slots (this host); a few attempts while Redis is unreachable. Returns how many."""
    client = build_redis(settings.redis_url, cluster=settings.redis_cluster, max_connections=2,
                         socket_timeout=max(settings.redis_socket_timeout, 1.0))
    limiter = RateLimiter(client)
    owner = worker_owner(pid)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return limiter.reap(owner)
        except RateLimiterError as exc:
            if attempt == ATTEMPTS:
                raise
            log.warning("releasing a dead worker's slots failed, retrying: %s", type(exc.__cause__ or exc).__name__)
            time.sleep(RETRY_SECONDS)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m app.ratelimit.reap PID", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"G-AIGateway: cannot release worker slots: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    pid = int(argv[1])
    try:
        released = reap(settings, pid)
    except RateLimiterError as exc:
        log.error("a dead worker's concurrency slots were not released (their lease frees them): %s",
                  type(exc.__cause__ or exc).__name__, extra={"worker_pid": pid})
        return 1
    if released:
        log.info("released %d concurrency slots of dead worker %d", released, pid, extra={"worker_pid": pid})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
