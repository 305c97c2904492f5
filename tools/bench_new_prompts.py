"""`tools/bench.py new-prompts`: the gateway at its defaults (L2 on) when every prompt is new.

The normal case for an application: temperature 0, most prompts never seen before. Side by side in alternating
rounds: the mock upstream directly, the gateway with the cache off, and the gateway at its defaults (exact + semantic
cache, local embeddings). Every request carries a prompt no earlier request had (LLM-style templates, each made
unique by a number), so nothing is ever a hit and L2 pays its whole cost on every request. Memory is the resident
set of the master and its workers after the run; start-up is the time from launch to a worker answering /readyz.
`--exact-only` adds the gateway with L0/L1 on and L2 off, to split the defaults' cost between the two.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from tools.bench import (
    ROOT,
    UPSTREAM_KEY,
    MockUpstream,
    Sample,
    Target,
    chat_body,
    check,
    checkout_rev,
    fmt,
    log,
    mark,
    pct_ms,
    print_round_differences,
    run,
    start_gateway,
    worker_pids,
)

if TYPE_CHECKING:
    from tests.support import Gateway

# LLM-style requests an application sends from templates; {n} makes each one new.
TEMPLATES = (
    "Summarise support ticket {n} in one line for the on-call engineer.",
    "Write a friendly reminder email to customer {n} about their unpaid invoice.",
    "Explain error code E{n} to a user who is not technical.",
    "Translate order note {n} into French, keeping product names unchanged.",
    "Classify the sentiment of review {n} as positive, negative or neutral.",
    "Draft a product description for catalogue item {n}, under 50 words.",
    "List three follow-up questions to ask applicant {n} after the interview.",
    "Write a SQL query that returns the orders of customer {n} from last month.",
    "Suggest a subject line for newsletter issue {n} about our spring sale.",
    "Extract the shipping address from message {n} as JSON.",
    "What are the next steps for incident {n} after the database failover?",
    "Rewrite paragraph {n} of the onboarding guide in plain English.",
)


EXACT_ONLY = "gateway, exact cache only (L2 off)"


def bodies(run_id: str) -> list[str]:
    system = f"You are the assistant of the G-AIGateway benchmark app {run_id}."
    return [chat_body(t, system=system, temperature=0) for t in TEMPLATES]


def rss_mb(master: int) -> float:
    """Resident memory of the master and its workers, in MB."""
    total = 0
    for pid in [master, *worker_pids(master)]:
        try:
            with open(f"/proc/{pid}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024.0


def startup_seconds(env: dict[str, str], workers: int) -> tuple[float, object]:
    """Launch a gateway and time it until /readyz answers 200."""
    from tests.support import Gateway

    started = time.monotonic()
    gateway = Gateway(env, workers=workers, timeout=120)
    while requests.get(gateway.url + "/readyz", timeout=5).status_code != 200:
        time.sleep(0.02)
    return time.monotonic() - started, gateway


def new_prompts_mode(args: argparse.Namespace) -> None:
    run_id = f"{time.time_ns() % 10**9}"
    templates = bodies(run_id)
    notes: list[str] = []
    with ExitStack() as stack:
        log("starting the mock upstream and two gateways (cache off; defaults with L2 on) ...")
        mock = MockUpstream("--latency", str(args.latency))
        stack.callback(mock.stop)
        common = {"TARGET_URL": mock.url, "UPSTREAM_API_KEYS": UPSTREAM_KEY, "AUTH_DISABLED": "true"}
        off_start, _ = startup_seconds({**common, "CACHE_ENABLED": "false"}, args.workers)
        _.stop()
        default_start, probe = startup_seconds(common, args.workers)
        probe.stop()
        from tools.bench_client import LoadGenerator

        load = LoadGenerator()
        stack.callback(load.close)
        targets = [Target("direct", mock.url, {"Authorization": f"Bearer {UPSTREAM_KEY}"})]
        gateways: dict[str, Gateway] = {}

        def add(name: str, env: dict[str, str], root: Path = ROOT) -> Gateway:
            """One more gateway in the rounds (its rows named `name`), stopped when the run ends."""
            gateway, pids = start_gateway(env, args.workers, root=root)
            stack.callback(gateway.stop)
            targets.append(Target(name, gateway.url, {}, pids))
            gateways[name] = gateway
            return gateway

        add("gateway, cache off", {**common, "CACHE_ENABLED": "false"})
        gw_default = add("gateway, defaults (L2 on)", common)
        if args.exact_only:  # where the defaults' cost lies: the exact cache alone, in the same rounds
            add(EXACT_ONLY, {**common, "SEMANTIC_CACHE_ENABLED": "false"})
        for checkout in args.baseline:  # the defaults as another checkout runs them: before/after in one run
            add(f"gateway, defaults (L2 on) at {checkout_rev(checkout)}", common, checkout)
        start = 10_000_000
        rows: list[tuple[int, list[Sample]]] = []
        for concurrency in args.concurrency:
            for target in targets:  # warm-up: connections, first embeddings, the partition's first entries
                run(load, target, templates, concurrency=concurrency, seconds=args.warmup_seconds, start=start,
                    cpu=False)
                start += 1_000_000
            samples = [Sample() for _ in targets]
            for round_no in range(args.rounds):
                order = list(range(len(targets)))
                order = order[round_no % len(order):] + order[: round_no % len(order)]
                for i in order:
                    samples[i].add(run(load, targets[i], templates, concurrency=concurrency,
                                       seconds=args.seconds, start=start))
                    start += 1_000_000
            for target, sample in zip(targets, samples, strict=True):
                check(sample, f"c={concurrency} {target.name}", notes)
            rows.append((concurrency, samples))
            log(f"  c={concurrency}: " + ", ".join(f"{t.name} {s.rps:.0f}/s" for t, s in zip(targets, samples,
                                                                                             strict=True)))
        memory = {name: rss_mb(gateway.process.pid) for name, gateway in gateways.items()}
        in_worker = {name: in_worker_ms(gateway) for name, gateway in gateways.items()}
        stats = requests.get(gw_default.metrics_url, timeout=10).text
    starts = {"gateway, cache off": off_start, "gateway, defaults (L2 on)": default_start}
    print_table(args, targets, rows, memory, starts, notes, stats)
    print("\nIn-worker time (median of latency_ms - upstream_ms over every request of the run, from each "
          "gateway's log): " + "; ".join(f"{name} {value:.2f} ms" for name, value in in_worker.items()))


def in_worker_ms(gateway: Gateway) -> float:
    """The gateway's own share of its requests' time: the log line's latency less the upstream's."""
    lines = [line for line in gateway.request_lines()
             if line.get("upstream_ms") is not None and line.get("latency_ms") is not None]
    values = sorted(line["latency_ms"] - line["upstream_ms"] for line in lines)
    return values[len(values) // 2] if values else float("nan")


def cpu_check(concurrency: int, cpu_ms: float, cache_off_ms: float) -> str:
    """The CPU target's line. The issue measured CPU per request under load (its figures: cache off ~0.9 ms, the
    defaults ~19 ms, i.e. two cores over its ~100 req/s at c=32), so the target applies at c=32. One request at a
    time a worker idles between requests and runs on cold caches (the cache-off gateway alone then uses more than
    2 ms): that figure is printed beside the cache-off gateway's, for what the cache adds."""
    line = f"CPU per new prompt at c={concurrency}: {fmt(cpu_ms, 3)} ms"
    if concurrency == 32:
        return f"{line} (target <= 2 ms: {mark(cpu_ms <= 2)})"
    return f"{line} (cache off: {fmt(cache_off_ms, 3)} ms; the target is c=32's)"


def print_table(args: argparse.Namespace, targets: list[Target], rows: list[tuple[int, list[Sample]]],
                memory: dict[str, float], starts: dict[str, float], notes: list[str], metrics: str) -> None:
    print(f"\n### Every prompt new (mock upstream latency {args.latency * 1000:.0f} ms, {args.workers} gevent "
          f"workers, {args.rounds} alternating rounds x {args.seconds:g} s per cell)\n")
    print("| c | path | p50 ms | p99 ms | req/s | overhead p50 ms | overhead p99 ms | req/s % of direct "
          "| gateway CPU ms/req | RSS master+workers MB | start to ready s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    checks: list[str] = []
    for concurrency, samples in rows:
        direct = samples[0]
        d50, d99 = pct_ms(direct.latencies, 50), pct_ms(direct.latencies, 99)
        for target, sample in zip(targets, samples, strict=True):
            p50, p99 = pct_ms(sample.latencies, 50), pct_ms(sample.latencies, 99)
            if target is targets[0]:
                print(f"| {concurrency} | {target.name} | {fmt(p50)} | {fmt(p99)} | {sample.rps:.0f} | | | | | | |")
                continue
            share = 100.0 * sample.rps / direct.rps if direct.rps else float("nan")
            print(f"| {concurrency} | {target.name} | {fmt(p50)} | {fmt(p99)} | {sample.rps:.0f} | {fmt(p50 - d50)} "
                  f"| {fmt(p99 - d99)} | {fmt(share, 0)}% | {fmt(sample.cpu_ms, 3)} | {memory[target.name]:.0f} "
                  f"| {fmt(starts.get(target.name, float('nan')))} |")
            if target is targets[2]:
                if concurrency == 1:
                    checks.append(f"c=1 overhead p50 {fmt(p50 - d50)} ms (target <= 3 ms: {mark(p50 - d50 <= 3)})")
                if concurrency == 32:
                    checks.append(f"c=32 {fmt(share, 0)}% of direct (target >= 85%: {mark(share >= 85)})")
                checks.append(cpu_check(concurrency, sample.cpu_ms, samples[1].cpu_ms))
    if 32 not in args.concurrency:
        checks.append("c=32 not measured (--concurrency): its share and CPU targets not checked")
    default = targets[2].name
    checks.append(f"memory, master + {args.workers} workers: {memory[default]:.0f} MB (target <= 300 MB: "
                  f"{mark(memory[default] <= 300)})")
    checks.append(f"start-up to ready: {starts[default]:.2f} s (target <= 3 s: {mark(starts[default] <= 3)})")
    print("\nTargets (defaults, L2 on):\n")
    for line in checks:
        print(f"- {line}")
    print_round_differences(targets, [("new prompts", concurrency, samples) for concurrency, samples in rows])
    counted = [row for row in metrics.splitlines()
               if row.startswith(("gateway_embeddings_total{", "gateway_semantic_skipped_total{"))]
    print("\nL2 work in the defaults gateway (its /metrics): " + "; ".join(counted))
    for note in notes:
        print(f"- note: {note}")
