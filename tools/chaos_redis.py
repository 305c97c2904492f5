"""Chaos experiment: a slow Redis (`DEBUG SLEEP` in a loop) under load, against the same gateway with Redis well.

    .venv/bin/python tools/chaos_redis.py [--seconds 6] [--rounds 2] [--concurrency 32] [--sleep 2]

A gateway (2 gevent workers, cache and rate limits on: every request asks the limiter, looks up and stores in
L1, and settles at its end) runs on a Redis of its own on another loopback port, with the mock upstream behind
it. Short phases alternate: Redis well, then Redis answering each command only after a `DEBUG SLEEP` of
`--sleep` seconds (one client sleeps it again as soon as it returns). The load is `--concurrency` keep-alive
clients, each sending its next request when the last one is answered (tools/bench_client.py). Target
(issue 12, item 4): throughput while slow >= 80 % of normal, p99 <= REDIS_REQUEST_BUDGET + 50 ms.

`slow_redis()` runs the experiment and returns the figures; `table()` prints them (tools/chaos.py calls both).
About 30 s with the defaults; the load stays on 127.0.0.1 and ends with the run.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import redis  # noqa: E402
import requests  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import MockUpstream, RedisServer  # noqa: E402
from tools.bench import CHAT_PATH, Sample, chat_body, fmt, log, pct_ms, start_gateway  # noqa: E402
from tools.bench_client import LoadGenerator  # noqa: E402

BREAKER_PAUSE = 1.0  # app/breaker.py's default pause: how long to let the gateway settle between phases


class RedisSleeper:
    """One client that keeps Redis asleep: `DEBUG SLEEP s`, again as soon as it returns, until stopped."""

    def __init__(self, url: str, seconds: float) -> None:
        self.seconds = seconds
        self._client = redis.Redis.from_url(url, socket_timeout=seconds + 10)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-sleeper", daemon=True)
        self.sleeps = 0

    def __enter__(self) -> "RedisSleeper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.seconds + 15)  # the last sleep runs out
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._client.execute_command("DEBUG", "SLEEP", self.seconds)
            self.sleeps += 1


@dataclass
class SlowRedisResult:
    budget: float
    sleep: float
    concurrency: int
    workers: int
    normal: Sample = field(default_factory=Sample)
    slow: Sample = field(default_factory=Sample)

    @property
    def throughput_ratio(self) -> float:
        return self.slow.rps / self.normal.rps if self.normal.rps else float("nan")

    @property
    def p99_slow_ms(self) -> float:
        return pct_ms(self.slow.latencies, 99)

    @property
    def target_met(self) -> bool:
        return self.throughput_ratio >= 0.8 and self.p99_slow_ms <= self.budget * 1000 + 50


def slow_redis(*, seconds: float = 6.0, rounds: int = 2, concurrency: int = 32, workers: int = 2,
               sleep: float = 2.0, budget: float = 0.5, latency: float = 0.0,
               extra_env: dict[str, str] | None = None) -> SlowRedisResult:
    """Alternate `rounds` x (Redis well, Redis slow) phases of `seconds` each under `concurrency` clients.

    `extra_env`: more settings for the gateway (GEVENT_MONITOR_THREAD_ENABLE=true to find a blocked hub).
    """
    result = SlowRedisResult(budget=budget, sleep=sleep, concurrency=concurrency, workers=workers)
    client_key = "sk-chaos-" + uuid.uuid4().hex
    with ExitStack() as stack:
        server = RedisServer(debug=True).start()
        stack.callback(server.kill)
        mock = MockUpstream("--latency", str(latency))
        stack.callback(mock.stop)
        env = {
            "TARGET_URL": mock.url, "UPSTREAM_API_KEYS": "sk-chaos-upstream", "REDIS_URL": server.url,
            "GATEWAY_API_KEYS": f"chaos:{client_key}", "SEMANTIC_CACHE_ENABLED": "false",
            # Limits far above the load: every request still costs an EVALSHA, a slot, and a settlement.
            "RATE_LIMIT_RPM": "100000000", "RATE_LIMIT_TPM": "1000000000", "RATE_LIMIT_CONCURRENCY": "100000",
            "REDIS_REQUEST_BUDGET": str(budget), **(extra_env or {}),
        }
        gateway, pids = start_gateway(env, workers)
        stack.callback(gateway.stop)
        load = LoadGenerator()
        stack.callback(load.close)
        headers = {"Authorization": f"Bearer {client_key}"}
        probe = requests.post(gateway.url + CHAT_PATH, data=chat_body("probe"), headers=headers, timeout=10)
        if probe.status_code != 200 or "x-ratelimit-limit-requests" not in probe.headers:
            raise SystemExit(f"gateway not limited or not answering: {probe.status_code} {probe.text[:200]}")
        body = chat_body("chaos {n}: explain why a slow dependency hurts more than a dead one.")
        spec: dict[str, Any] = {
            "host": "127.0.0.1", "port": gateway.port, "concurrency": concurrency, "seconds": seconds,
            "warmup": 1, "cpu_pids": pids, "header": "x-cache",
            "request": {"method": "POST", "path": CHAT_PATH, "headers": headers, "body": body},
        }
        start = 0
        for i in range(rounds):
            log(f"round {i + 1}/{rounds}: Redis well ...")
            result.normal.add(load.run(**spec, start=start))
            start += 10**6
            log(f"round {i + 1}/{rounds}: Redis answering after DEBUG SLEEP {sleep} ...")
            with RedisSleeper(server.url, sleep):
                time.sleep(0.2)  # the first sleep has begun
                result.slow.add(load.run(**spec, start=start))
            start += 10**6
            # The last sleep has run out; the breakers close again (a pause, then three PINGs) before the next phase.
            time.sleep(BREAKER_PAUSE * 3)
    return result


def table(result: SlowRedisResult) -> str:
    """The figures as a markdown table, and whether the target was met."""
    lines = [
        f"Redis `DEBUG SLEEP {result.sleep:g}` in a loop; {result.workers} workers, {result.concurrency} clients, "
        f"REDIS_REQUEST_BUDGET={result.budget:g} s",
        "",
        "| Redis | requests | req/s | p50 ms | p99 ms | max ms | >= budget | non-200 | X-Cache BYPASS | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sample in (("well", result.normal), ("slow", result.slow)):
        bypass = sum(1 for tag in sample.tags if tag == "BYPASS")
        over = sum(1 for latency in sample.latencies if latency >= result.budget)
        lines.append(
            f"| {name} | {sample.count} | {fmt(sample.rps, 0)} | {fmt(pct_ms(sample.latencies, 50), 1)} | "
            f"{fmt(pct_ms(sample.latencies, 99), 1)} | {fmt(pct_ms(sample.latencies, 100), 1)} | {over} | "
            f"{sample.non_200} | {bypass} | {sample.errors} |"
        )
    ratio = result.throughput_ratio
    lines += [
        "",
        f"throughput slow / well: {fmt(100 * ratio, 1)} % (target >= 80 %); p99 while slow "
        f"{fmt(result.p99_slow_ms, 1)} ms (target <= {result.budget * 1000 + 50:.0f} ms): "
        f"{'met' if result.target_met else 'NOT met'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="well/slow phase pairs")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=2.0, help="DEBUG SLEEP seconds")
    parser.add_argument("--budget", type=float, default=0.5, help="REDIS_REQUEST_BUDGET")
    parser.add_argument("--latency", type=float, default=0.0, help="mock upstream latency")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON too")
    args = parser.parse_args(argv)
    result = slow_redis(seconds=args.seconds, rounds=args.rounds, concurrency=args.concurrency,
                        workers=args.workers, sleep=args.sleep, budget=args.budget, latency=args.latency)
    print(table(result))
    if args.json:
        print(json.dumps({"throughput_ratio": result.throughput_ratio, "p99_slow_ms": result.p99_slow_ms,
                          "target_met": result.target_met}))


if __name__ == "__main__":
    main()
