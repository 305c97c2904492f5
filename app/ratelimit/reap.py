"""Release the concurrency slots a dead worker still holds.

    python -m app.ratelimit.reap PID      # once, for one dead worker
    python -m app.ratelimit.reap --serve  # one dead worker's pid per line on stdin, until stdin closes

gunicorn's master tells a `--serve` process of its own (started when it is ready) about each worker that exits
(`child_exit`: a SIGKILL, the OOM killer, a graceful timeout run out). The master itself must not import
redis-py (it would import `ssl` before the workers' gevent patches it), and a process started per exit would
spend most of the 2 s this may take on its own start. Each slot carries its worker's name (`worker_owner`), and
each worker notes which concurrency sets it holds slots in, so nothing is scanned. If Redis cannot be reached
for a while, the slots' lease (15 s) frees them anyway.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import TextIO

from app.config import ConfigError, Settings
from app.observability.logging import configure_logging
from app.ratelimit.limiter import RateLimiter, RateLimiterError, worker_owner
from app.redis_client import build_redis

log = logging.getLogger("app.ratelimit.reap")

ATTEMPTS = 5
RETRY_SECONDS = 1.0


def build_limiter(settings: Settings) -> RateLimiter:
    client = build_redis(settings.redis_url, cluster=settings.redis_cluster, max_connections=2,
                         socket_timeout=max(settings.redis_socket_timeout, 1.0))
    return RateLimiter(client)


def reap(limiter: RateLimiter, pid: int) -> int:
    """Release worker `pid`'s slots (this host); a few attempts while Redis is unreachable. Returns how many."""
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


def release(limiter: RateLimiter, pid: int) -> bool:
    """`reap`, logged; False when the slots stay (their lease frees them)."""
    try:
        released = reap(limiter, pid)
    except RateLimiterError as exc:
        log.error("a dead worker's concurrency slots were not released (their lease frees them): %s",
                  type(exc.__cause__ or exc).__name__, extra={"worker_pid": pid})
        return False
    if released:
        log.info("released %d concurrency slots of dead worker %d", released, pid, extra={"worker_pid": pid})
    return True


def serve(limiter: RateLimiter, lines: TextIO) -> None:
    """One pid per line until the master closes the pipe (it exited)."""
    for line in lines:
        if line.strip().isdigit():
            release(limiter, int(line))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not (argv[1].isdigit() or argv[1] == "--serve"):
        print("usage: python -m app.ratelimit.reap PID | --serve", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"G-AIGateway: cannot release worker slots: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    limiter = build_limiter(settings)
    if argv[1] == "--serve":
        # Ctrl-C in a terminal reaches the whole process group: this process ends with the master (stdin closes).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        serve(limiter, sys.stdin)
        return 0
    return 0 if release(limiter, int(argv[1])) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
