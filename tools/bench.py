"""Benchmarks of the gateway under gunicorn on loopback, printed as markdown tables for the README.

    .venv/bin/python tools/bench.py proxy     # proxy overhead: direct vs through the gateway, c = 1, 32, 128
    .venv/bin/python tools/bench.py proxy --traces  # ... and (t): (b) with every request traced (OTLP to a sink)
    .venv/bin/python tools/bench.py cache     # cache layers: miss, L0, L1, L2 hits; L1 throughput; L2 search
    .venv/bin/python tools/bench.py new-prompts   # defaults (L2 on), every prompt new: vs direct and cache off
    .venv/bin/python tools/bench.py instructions --baseline CHECKOUT  # a worker's instructions per request (callgrind)

The machine is small and shared, so only what is measured side by side in one run means anything: targets are
measured in alternating short rounds and reported with ratios. The load comes from tools/bench_client.py in its own
gevent process, so its CPU is small and separate. Each mode takes about two minutes by default (--rounds and
--seconds make longer runs).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the gateway's workers run numpy; before importing it

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import requests  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import Gateway, MockUpstream, OtlpReceiver, worker_pids  # noqa: E402
from tools.bench_client import LoadGenerator, cpu_ticks  # noqa: E402

UPSTREAM_KEY = "bench-key"
CHAT_PATH = "/v1/chat/completions"
TRACED = "gateway (t) = (b), traced"  # proxy --traces
MODEL = "mock-gpt"
# Paraphrase pairs for L2 (stored question, later question); {n} makes every pair unique, so exact keys never
# repeat. Each passes app/cache/verify.py with the local model (cosine 0.9-0.99 on their own).
PARAPHRASES = (
    ("How do I reset the password of account {n}?", "How can I reset my password for account {n}?"),
    ("What is the status of order {n}?", "What's the status of my order {n}?"),
    ("How do I cancel subscription {n}?", "How can I cancel my subscription {n}?"),
    ("When will invoice {n} be paid?", "When is invoice {n} going to be paid?"),
    ("Where is my package with tracking number {n}?", "Where is the package with tracking number {n}?"),
    ("Can you explain error code {n}?", "Could you explain error code {n}?"),
    ("Why was payment {n} declined?", "Why did payment {n} get declined?"),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Processes


def wait_workers_idle(gateway: Gateway, workers: int, timeout: float = 120) -> list[int]:
    """Wait until every worker has booted: all forked and their CPU time still for 0.6 s (the model is loaded).

    /healthz answers as soon as one worker is up; keep-alive connections opened before the other one accepts
    would all stay on the first worker.
    """
    deadline = time.monotonic() + timeout
    last: tuple[list[int], int] | None = None
    quiet = 0
    while time.monotonic() < deadline:
        pids = worker_pids(gateway.process.pid)
        now = (pids, cpu_ticks(pids))
        quiet = quiet + 1 if len(pids) == workers and now == last else 0
        if quiet >= 3:
            return pids
        last = now
        time.sleep(0.2)
    raise TimeoutError(f"gateway workers not idle after {timeout}s (log: {gateway.log_path})")


def per_worker_ticks(pids: list[int]) -> list[int]:
    return [cpu_ticks([pid]) for pid in pids]


# ---------------------------------------------------------------------------------------------------------------
# Requests and results


def chat_body(user: str, *, system: str = "You are a concise assistant for the G-AIGateway benchmark.",
              stream: bool = False, temperature: float | None = None) -> str:
    """A plain chat completion body (about 300 bytes for a one-line question)."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 64,
        "user": "bench",
    }
    if temperature is not None:
        body["temperature"] = temperature
    if stream:
        body["stream"] = True
        # The mock pads OpenAI-shaped stream chunks as OpenAI does by default; trees before ebe9b0b took padded
        # chunks for ones they could not follow and skipped their work, so `--baseline` runs against them would
        # compare unequal work. Without it every tree sees the stream this README's figures were measured with.
        body["stream_options"] = {"include_obfuscation": False}
    return json.dumps(body)


@dataclass
class Target:
    """Where a phase sends its requests, and whose CPU it reads."""

    name: str
    url: str
    headers: dict[str, str]
    cpu_pids: list[int] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@dataclass
class Sample:
    """Results of one or more phases against one target, added up."""

    latencies: list[float] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    wall: float = 0.0
    cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    round_p50s: list[float] = field(default_factory=list)  # each added phase's own median, ms

    def add(self, result: dict[str, Any]) -> None:
        self.latencies += result["latencies"]
        self.round_p50s.append(pct_ms(result["latencies"], 50))
        self.tags += result["tags"]
        self.wall += result["wall"]
        self.cpu_seconds += result["cpu_seconds"]
        self.client_cpu_seconds += result["client_cpu_seconds"]
        self.errors += result["error_count"]
        self.error_examples += result["errors"][:3]
        for status, count in result["statuses"].items():
            self.statuses[status] = self.statuses.get(status, 0) + count

    def tagged(self, tag: str) -> np.ndarray:
        return np.array([lat for lat, t in zip(self.latencies, self.tags, strict=True) if t == tag])

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.count / self.wall if self.wall else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000.0 * self.cpu_seconds / self.count if self.count else float("nan")

    @property
    def non_200(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != "200")


def pct_ms(latencies: Any, q: float) -> float:
    values = np.asarray(latencies, dtype=float)
    return float(np.percentile(values, q) * 1000.0) if values.size else float("nan")


def run(load: LoadGenerator, target: Target, body: str | list[str], *, concurrency: int,
        seconds: float | None = None, count: int | None = None, start: int = 0, warmup: int = 1,
        stream: bool = False, cpu: bool = True) -> dict[str, Any]:
    return load.run(
        host="127.0.0.1", port=target.port, concurrency=concurrency, seconds=seconds, count=count, start=start,
        warmup=warmup, stream=stream, cpu_pids=target.cpu_pids if cpu else [],
        request={"method": "POST", "path": CHAT_PATH, "headers": target.headers, "body": body},
    )


def check(sample: Sample, what: str, notes: list[str]) -> None:
    """Failed requests make a row meaningless: say so under the table."""
    if sample.errors or sample.non_200:
        notes.append(f"{what}: {sample.errors} failed requests, statuses {sample.statuses}, "
                     f"e.g. {sample.error_examples[:2]}")


def blas_line() -> str:
    """numpy's BLAS, as built (threadpoolctl is not a dependency)."""
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        name = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 - an informational line only; older numpy has no mode="dicts"
        name = "unknown"
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS") if k in os.environ)
    return f"numpy {np.__version__}, BLAS {name} ({env or 'no OPENBLAS_* set'})"


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"  # noqa: PLR0124 - NaN check


def mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


# ---------------------------------------------------------------------------------------------------------------
# proxy mode


def start_gateway(env: dict[str, str], workers: int, root: Path = ROOT) -> tuple[Gateway, list[int]]:
    gateway = Gateway(env, workers=workers, timeout=120, root=root)
    try:
        pids = wait_workers_idle(gateway, workers)
    except TimeoutError:
        gateway.stop()
        raise
    return gateway, pids


def checkout_rev(checkout: Path) -> str:
    """A `--baseline` checkout's short commit, for its rows' names (the path when it is not a git tree)."""
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip() or str(checkout)


def proxy_mode(args: argparse.Namespace) -> None:
    """Direct (client -> mock) against through the gateway, with auth off and with auth + rate limiting on."""
    client_key = "gw-bench-" + uuid.uuid4().hex
    auth = {"Authorization": f"Bearer {client_key}"}
    notes: list[str] = []
    with ExitStack() as stack:
        log("starting the mock upstream and two gateways ...")
        mock = MockUpstream("--latency", str(args.latency))
        stack.callback(mock.stop)
        common = {"TARGET_URL": mock.url, "UPSTREAM_API_KEYS": UPSTREAM_KEY, "CACHE_ENABLED": "false",
                  "SEMANTIC_CACHE_ENABLED": "false"}
        gw_open, open_pids = start_gateway({**common, "AUTH_DISABLED": "true"}, args.workers)
        stack.callback(gw_open.stop)
        limited_env = {"AUTH_DISABLED": "false", "GATEWAY_API_KEYS": f"bench:{client_key}",
                       "RATE_LIMIT_RPM": "100000000", "RATE_LIMIT_TPM": "0"}
        gw_auth, auth_pids = start_gateway({**common, **limited_env}, args.workers)
        stack.callback(gw_auth.stop)
        extra: list[tuple[str, Gateway, list[int], dict[str, str]]] = []  # more targets: name, gateway, pids, headers
        if args.fallbacks:
            # (b) again with fallback rules for the bench's model: nothing fails, so they must cost nothing.
            gw_rules, rules_pids = start_gateway({**common, **limited_env,
                                                  "UPSTREAMS_FILE": fallback_rules_file(stack, mock.url)},
                                                 args.workers)
            stack.callback(gw_rules.stop)
            extra.append(("gateway (c) = (b) + fallback rules", gw_rules, rules_pids, auth))
        if args.budget:
            # (b) again with a daily budget nothing reaches: the budget rides in the limiter's script and its
            # settlement in the background, so this against (b) is the price of budgets.
            gw_budget, budget_pids = start_gateway({**common, **limited_env, **budget_env(client_key, stack)},
                                                   args.workers)
            stack.callback(gw_budget.stop)
            probe = requests.post(gw_budget.url + CHAT_PATH, data=chat_body("probe"), headers=auth, timeout=10)
            if probe.status_code != 200 or "x-budget-limit-usd-day" not in probe.headers:
                raise SystemExit(f"the budget gateway answered {probe.status_code} without a budget: "
                                 f"{probe.text[:300]}")
            extra.append((f"gateway ({'cd'[len(extra)]}) = (b) + a budget", gw_budget, budget_pids, auth))
        for checkout in args.baseline:
            # (a) and (b) as another checkout runs them (a worktree of an older commit): before/after in one run.
            rev = checkout_rev(checkout)
            for name, env, headers in (("(a) auth off", {**common, "AUTH_DISABLED": "true"}, {}),
                                       ("(b) auth + rate limit", {**common, **limited_env}, auth)):
                gateway, pids = start_gateway(env, args.workers, root=checkout)
                stack.callback(gateway.stop)
                extra.append((f"gateway {name} at {rev}", gateway, pids, headers))
        sink = None
        if args.traces:  # (b) again, every request traced: spans to an OTLP receiver in this process (a sink)
            sink = OtlpReceiver(keep=False)
            stack.callback(sink.stop)
            gw_traced, traced_pids = start_gateway({**common, **limited_env, "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
                                                    "OTEL_TRACES_SAMPLER": "always_on"}, args.workers)
            stack.callback(gw_traced.stop)
            extra.append((TRACED, gw_traced, traced_pids, auth))
        load = LoadGenerator()
        stack.callback(load.close)

        probe = requests.post(gw_auth.url + CHAT_PATH, data=chat_body("probe"), headers=auth, timeout=10)
        limited = "x-ratelimit-limit-requests" in probe.headers
        if probe.status_code != 200:
            raise SystemExit(f"gateway (b) answered {probe.status_code}: {probe.text[:300]}")
        if not limited:
            notes.append("rate limiting is not wired (no x-ratelimit-* headers): configuration (b) ran with auth only")
        targets = [
            Target("direct", mock.url, {"Authorization": f"Bearer {UPSTREAM_KEY}"}),
            Target("gateway (a) auth off", gw_open.url, {}, open_pids),
            Target("gateway (b) auth + rate limit" if limited else "gateway (b) auth", gw_auth.url, auth, auth_pids),
            *(Target(name, gateway.url, headers, pids) for name, gateway, pids, headers in extra),
        ]
        body = chat_body("Explain in two sentences why keep-alive connections matter for a reverse proxy.")
        stream_body = chat_body("Explain in two sentences why keep-alive connections matter for a reverse proxy.",
                                stream=True)
        log(f"request body {len(body)} bytes; {args.rounds} rounds x {args.seconds}s per target and concurrency")

        rows: list[tuple[str, int, list[Sample]]] = []
        for kind, levels, payload, stream in (("chat", args.concurrency, body, False),
                                              ("stream", args.stream_concurrency, stream_body, True)):
            for concurrency in levels:
                samples = measure_round_robin(load, targets, payload, concurrency, args, stream=stream)
                rows.append((kind, concurrency, samples))
                for target, sample in zip(targets, samples, strict=True):
                    check(sample, f"{kind} c={concurrency} {target.name}", notes)
                log(f"  {kind} c={concurrency}: " + ", ".join(
                    f"{t.name} p50 {pct_ms(s.latencies, 50):.2f} ms {s.rps:.0f}/s"
                    for t, s in zip(targets, samples, strict=True)))
        balance = worker_balance(open_pids + auth_pids + [pid for _n, _g, pids, _h in extra for pid in pids])
        if sink is not None:
            time.sleep(6)  # the batch processor's schedule (5 s): the last spans arrive
            notes.append(f"{TRACED}: {sink.count} spans received in {sink.exports} OTLP exports")

    print_proxy_table(args, targets, rows, notes, balance)


def fallback_rules_file(stack: ExitStack, mock_url: str) -> str:
    """An UPSTREAMS_FILE with the mock as its one backend (as TARGET_URL + UPSTREAM_API_KEYS make it) and fallback
    chains for the bench's model, removed when the run ends."""
    import tempfile

    handle, path = tempfile.mkstemp(prefix="bench-upstreams-", suffix=".yaml")
    os.close(handle)
    stack.callback(os.unlink, path)
    Path(path).write_text(json.dumps({  # JSON is YAML
        "backends": [{"name": "bench", "url": mock_url, "keys": [UPSTREAM_KEY]}],
        "fallbacks": {MODEL: ["gpt-4o-mini", "deepseek-chat"]},
        "context_window_fallbacks": {MODEL: ["gpt-4o"]},
    }))
    return path


def budget_env(client_key: str, stack: ExitStack) -> dict[str, str]:
    """A keys file giving the bench tenant a budget of a million dollars a day, and prices for the mock's model."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="bench-budget-"))
    stack.callback(lambda: [p.unlink() for p in directory.iterdir()] and directory.rmdir())
    (directory / "keys.yaml").write_text(json.dumps({"tenants": [
        {"name": "bench", "keys": [client_key], "budget": {"usd_per_day": 1_000_000}}]}))
    (directory / "prices.yaml").write_text(json.dumps({"models": {
        MODEL: {"input": 0.28, "cached_input": 0.028, "output": 0.42}}}))
    return {"GATEWAY_API_KEYS": "", "GATEWAY_KEYS_FILE": str(directory / "keys.yaml"),
            "PRICES_FILE": str(directory / "prices.yaml")}


def measure_round_robin(load: LoadGenerator, targets: list[Target], body: str, concurrency: int,
                        args: argparse.Namespace, *, stream: bool) -> list[Sample]:
    """Warm each target up, then alternate short rounds between them (rotating the order) so noise hits all."""
    for target in targets:
        run(load, target, body, concurrency=concurrency, seconds=args.warmup_seconds, warmup=2, stream=stream,
            cpu=False)
    samples = [Sample() for _ in targets]
    for round_no in range(args.rounds):
        order = list(range(len(targets)))
        order = order[round_no % len(order):] + order[: round_no % len(order)]
        for i in order:
            samples[i].add(run(load, targets[i], body, concurrency=concurrency, seconds=args.seconds,
                               warmup=1, stream=stream))
    return samples


def worker_balance(pids: list[int]) -> str:
    ticks = per_worker_ticks(pids)
    return ", ".join(f"{pid}: {t / os.sysconf('SC_CLK_TCK'):.1f}s" for pid, t in zip(pids, ticks, strict=True))


def print_proxy_table(args: argparse.Namespace, targets: list[Target], rows: list[tuple[str, int, list[Sample]]],
                      notes: list[str], balance: str) -> None:
    print(f"\n### Proxy overhead (mock upstream latency {args.latency * 1000:.0f} ms, cache off, "
          f"{args.workers} gevent workers, {args.rounds} alternating rounds x {args.seconds:g} s per cell)\n")
    print("| request | c | path | p50 ms | p99 ms | req/s | overhead p50 ms | req/s % of direct | gateway CPU ms/req |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    checks: list[str] = []
    client_cpu = []
    for kind, concurrency, samples in rows:
        direct = samples[0]
        d50 = pct_ms(direct.latencies, 50)
        for target, sample in zip(targets, samples, strict=True):
            p50, p99 = pct_ms(sample.latencies, 50), pct_ms(sample.latencies, 99)
            client_cpu.append((sample.client_cpu_seconds, sample.count))
            if target is targets[0]:
                print(f"| {kind} | {concurrency} | {target.name} | {fmt(p50)} | {fmt(p99)} | {sample.rps:.0f} "
                      f"| | | |")
                continue
            overhead = p50 - d50
            share = 100.0 * sample.rps / direct.rps if direct.rps else float("nan")
            print(f"| {kind} | {concurrency} | {target.name} | {fmt(p50)} | {fmt(p99)} | {sample.rps:.0f} "
                  f"| {fmt(overhead)} | {fmt(share, 0)}% | {fmt(sample.cpu_ms, 3)} |")
            if kind == "chat" and concurrency == 1:
                checks.append(f"overhead p50 at c=1, {target.name}: {fmt(overhead)} ms (target <= 2 ms: "
                              f"{mark(overhead <= 2.0)})")
            if kind == "chat" and concurrency == 32:
                checks.append(f"req/s at c=32, {target.name}: {fmt(share, 0)}% of direct (target >= 85%: "
                              f"{mark(share >= 85.0)})")
            if kind == "chat":
                checks.append(f"CPU per request at c={concurrency}, {target.name}: {fmt(sample.cpu_ms, 3)} ms "
                              f"(target < 1 ms: {mark(sample.cpu_ms < 1.0)})")
            if target.name == TRACED:
                added = sample.cpu_ms - samples[2].cpu_ms
                checks.append(f"tracing's CPU per request, {kind} c={concurrency}: (t) - (b) = {fmt(added, 3)} ms "
                              f"(target <= 0.2 ms: {mark(added <= 0.2)})")
    print("\nTargets:\n")
    for line in checks:
        print(f"- {line}")
    print_round_differences(targets, rows)
    spent = sum(s for s, _ in client_cpu)
    done = sum(n for _, n in client_cpu)
    print(f"\nLoad generator CPU: {1000.0 * spent / max(done, 1):.3f} ms per request (its own process). "
          f"Gateway worker CPU totals: {balance}. {blas_line()}.")
    for note in notes:
        print(f"- note: {note}")


def round_differences(sample: Sample, baseline: Sample) -> tuple[float, float, float]:
    """A gateway's p50 less its baseline's, round by round (the rounds alternate, so each pair met the same
    machine): the median, lowest and highest of those differences, in ms. The direct path's p50 cancels out."""
    if len(sample.round_p50s) != len(baseline.round_p50s):
        raise ValueError("a gateway and its baseline must have run the same rounds")
    diffs = np.array(sample.round_p50s) - np.array(baseline.round_p50s)  # nan: a round without an answer
    return float(np.nanmedian(diffs)), float(np.nanmin(diffs)), float(np.nanmax(diffs))


def print_round_differences(targets: list[Target], rows: list[tuple[str, int, list[Sample]]]) -> None:
    """For each `--baseline` row, its twin's p50 against it round by round: what a single p50 difference hides
    is whether the rounds agree (a regression shows in every round, noise in some)."""
    names = [t.name for t in targets]
    pairs = [(names.index(name.rpartition(" at ")[0]), i) for i, name in enumerate(names)
             if " at " in name and name.rpartition(" at ")[0] in names]
    if not pairs:
        return
    print("\np50 against the baseline, round by round (this tree less the baseline; median, lowest, highest):\n")
    for kind, concurrency, samples in rows:
        for mine, base in pairs:
            median, low, high = round_differences(samples[mine], samples[base])
            print(f"- {kind} c={concurrency}, {names[mine]} vs {names[base].rpartition(' at ')[2]}: {median:+.2f} ms "
                  f"({low:+.2f} .. {high:+.2f}) over {len(samples[mine].round_p50s)} rounds")


# ---------------------------------------------------------------------------------------------------------------
# cache mode


def cache_mode(args: argparse.Namespace) -> None:
    """Miss, L0, L1 and L2 hit latency through gunicorn, L1 throughput, then L2 search time in-process."""
    run_id = uuid.uuid4().hex[:10]
    rng = random.Random()
    base = rng.randrange(10**6, 9 * 10**6) * 1000  # numbers in the questions: unique per run and round
    notes: list[str] = []
    upstream_headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    with ExitStack() as stack:
        log("starting the mock upstream and two gateways (the local embedding model loads in each worker) ...")
        mock = MockUpstream("--latency", str(args.latency))
        stack.callback(mock.stop)
        common = {"TARGET_URL": mock.url, "UPSTREAM_API_KEYS": UPSTREAM_KEY, "AUTH_DISABLED": "true",
                  "CACHE_ENABLED": "true"}
        gw_main, main_pids = start_gateway({**common, "SEMANTIC_CACHE_ENABLED": "true",
                                            "EMBEDDING_PROVIDER": "local"}, args.workers)
        stack.callback(gw_main.stop)
        # L0 off, so every exact hit is read from Redis; L2 off (an exact hit never reaches it) to save the model.
        gw_l1, l1_pids = start_gateway({**common, "LOCAL_CACHE_SIZE": "0", "SEMANTIC_CACHE_ENABLED": "false"},
                                       args.workers)
        stack.callback(gw_l1.stop)
        load = LoadGenerator()
        stack.callback(load.close)

        direct = Target("upstream direct", mock.url, upstream_headers)
        main = Target("gateway", gw_main.url, {}, main_pids)
        l1 = Target("gateway, L0 off", gw_l1.url, {}, l1_pids)
        system = f"You are the support assistant of shop {run_id}."  # a fresh L2 partition per run
        miss_body = chat_body(f"Benchmark {run_id}: summarise ticket {{n}} in one line.", system=system,
                              temperature=0)
        hit_body = chat_body(f"Benchmark {run_id}: what does a cache hit look like?", system=system, temperature=0)
        stored = [chat_body(a, system=system, temperature=0) for a, _ in PARAPHRASES]
        asked = [chat_body(b, system=system, temperature=0) for _, b in PARAPHRASES]
        pairs = len(PARAPHRASES) * args.pair_sets

        # Warm up: connections, the embedder's first calls, the hit entries themselves.
        run(load, direct, miss_body, concurrency=4, count=20, start=base - 100, cpu=False)
        run(load, main, miss_body, concurrency=4, count=20, start=base - 200, cpu=False)
        run(load, main, hit_body, concurrency=8, count=100, cpu=False)
        run(load, l1, hit_body, concurrency=8, count=100, cpu=False)

        s: dict[str, Sample] = {k: Sample() for k in ("direct", "miss", "L0", "L1", "L2", "L0 c32", "L1 c32")}
        for round_no in range(args.rounds):
            start = base + round_no * 10_000
            log(f"  round {round_no + 1}/{args.rounds}")
            s["direct"].add(run(load, direct, miss_body, concurrency=1, count=args.miss_count, start=start,
                                cpu=False))
            s["miss"].add(run(load, main, miss_body, concurrency=1, count=args.miss_count, start=start))
            s["L0"].add(run(load, main, hit_body, concurrency=1, count=args.hit_count))
            s["L1"].add(run(load, l1, hit_body, concurrency=1, count=args.hit_count))
            # L2: store the first phrasing of each pair, let the other worker sync (every 0.5 s), ask the second.
            run(load, main, stored, concurrency=4, count=pairs, start=start + 5000, warmup=0, cpu=False)
            time.sleep(1.0)
            s["L2"].add(run(load, main, asked, concurrency=1, count=pairs, start=start + 5000))
            s["L1 c32"].add(run(load, l1, hit_body, concurrency=32, seconds=args.seconds))
            s["L0 c32"].add(run(load, main, hit_body, concurrency=32, seconds=args.seconds))
        for name, sample in s.items():
            check(sample, name, notes)
        balance = worker_balance(main_pids + l1_pids)
        from tools.bench_new_prompts import rss_mb

        notes.append(f"memory of the L2 gateway after its L2 hits (the transformer loaded in the workers that "
                     f"needed it): master + {args.workers} workers {rss_mb(gw_main.process.pid):.0f} MB RSS")

    log("L2 search in one partition (in-process) ...")
    search_rows = search_bench(args)
    print_cache_table(args, s, search_rows, notes, balance, pairs)


def search_bench(args: argparse.Namespace) -> list[tuple[int, np.ndarray]]:
    """PartitionIndex.search() as the look-up calls it (from the candidate floor), over random unit vectors."""
    from app.cache.lexicon import verifier_model
    from app.cache.semantic import PartitionIndex
    from app.embeddings.static import TABLE_DIM

    floor = verifier_model().static_floor
    rng = np.random.default_rng(7)
    rows = []
    for size in args.search_sizes:
        vectors = rng.standard_normal((size, TABLE_DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index = PartitionIndex(TABLE_DIM)
        for i in range(size):
            index.add(f"e{i}", vectors[i], "", 2e9)
        queries = rng.standard_normal((args.queries, TABLE_DIM), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        now = time.time()
        for q in queries[:10]:
            index.search(q, floor, now)
        search_times = []
        for q in queries:
            t0 = time.perf_counter()
            index.search(q, floor, now)
            search_times.append(time.perf_counter() - t0)
        rows.append((size, np.array(search_times)))
        log(f"  {size} entries: search p50 {pct_ms(search_times, 50):.3f} ms")
    return rows


def print_cache_table(args: argparse.Namespace, s: dict[str, Sample],
                      search_rows: list[tuple[int, np.ndarray]], notes: list[str], balance: str,
                      pairs: int) -> None:
    print(f"\n### Cache layers through gunicorn ({args.workers} gevent workers, mock upstream latency "
          f"{args.latency * 1000:.0f} ms, local embeddings, {args.rounds} alternating rounds)\n")
    print("| request | served by | requests | p50 ms | p99 ms | gateway CPU ms/req | target |")
    print("|---|---|---:|---:|---:|---:|---|")

    def row(name: str, layer: str, latencies: np.ndarray, cpu: float, target: str) -> None:
        print(f"| {name} | {layer} | {len(latencies)} | {fmt(pct_ms(latencies, 50))} | {fmt(pct_ms(latencies, 99))} "
              f"| {fmt(cpu, 3)} | {target} |")

    direct = np.array(s["direct"].latencies)
    row("upstream directly (reference)", "mock", direct, float("nan"), "")
    miss = s["miss"].tagged("")
    row("miss (unique prompt, temperature 0)", "upstream", miss, s["miss"].cpu_ms,
        f"overhead p50 {fmt(pct_ms(miss, 50) - pct_ms(direct, 50))} ms")
    l0 = s["L0"].tagged("L0")
    l0_ok = pct_ms(l0, 50) <= 1.0
    row("same request repeated", "L0", l0, s["L0"].cpu_ms, f"p50 <= 1 ms: {mark(l0_ok)}")
    l1 = s["L1"].tagged("L1")
    row("same request, LOCAL_CACHE_SIZE=0", "L1", l1, s["L1"].cpu_ms,
        f"p50 <= 1 ms: {mark(pct_ms(l1, 50) <= 1.0)}")
    l2 = s["L2"].tagged("L2")
    row("paraphrase of a stored question", "L2", l2, s["L2"].cpu_ms,
        f"p50 <= 10 ms: {mark(pct_ms(l2, 50) <= 10.0)}")
    l2_missed = s["L2"].tagged("")
    if l2_missed.size:
        row("paraphrase not recognised", "upstream", l2_missed, float("nan"), "")
    print()
    print("| throughput, concurrency 32 | served by | requests | req/s | p50 ms | p99 ms | gateway CPU ms/req "
          "| target |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for key, layer, target in (("L1 c32", "L1", f"> 1,500 req/s: {mark(s['L1 c32'].rps > 1500)}"),
                               ("L0 c32", "L0", "")):
        sample = s[key]
        layers = sorted({t for t in sample.tags if t != layer})
        extra = f" (also {', '.join(layers or [])})" if layers else ""
        print(f"| same request{extra} | {layer} | {sample.count} | {sample.rps:.0f} | "
              f"{fmt(pct_ms(sample.latencies, 50))} | {fmt(pct_ms(sample.latencies, 99))} | "
              f"{fmt(sample.cpu_ms, 3)} | {target} |")
    print()
    print("| L2 index, one partition (in-process, static vectors, dim 256) | search() p50 ms | search() p99 ms "
          "| target |")
    print("|---:|---:|---:|---|")
    for size, times in search_rows:
        target = f"<= 5 ms: {mark(pct_ms(times, 50) <= 5.0)}" if size >= 50_000 else ""
        print(f"| {size:,} entries | {fmt(pct_ms(times, 50), 3)} | {fmt(pct_ms(times, 99), 3)} | {target} |")
    total = s["L2"].count
    print(f"\nL2 hit rate: {len(l2)}/{total} paraphrases answered from L2 ({100.0 * len(l2) / max(total, 1):.0f}%), "
          f"{len(PARAPHRASES)} question pairs x {args.pair_sets} numbers per round. {args.queries} random queries "
          f"per index size. {blas_line()}.")
    print(f"Gateway worker CPU totals: {balance}.")
    for note in notes:
        print(f"- note: {note}")


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    proxy = sub.add_parser("proxy", help="proxy overhead against the mock upstream")
    proxy.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    proxy.add_argument("--stream-concurrency", type=int, nargs="*", default=[1, 32])
    proxy.add_argument("--rounds", type=int, default=3, help="alternating rounds per target and concurrency")
    proxy.add_argument("--seconds", type=float, default=2.5, help="length of one round")
    proxy.add_argument("--warmup-seconds", type=float, default=1.0)
    proxy.add_argument("--baseline", type=Path, action="append", default=[], metavar="CHECKOUT",
                       help="also run (a) and (b) from another checkout (e.g. a git worktree of an older commit), "
                            "in the same rounds: a before/after comparison side by side (repeatable)")
    proxy.add_argument("--fallbacks", action="store_true",
                       help="also measure (b) with fallback rules configured (nothing failing): side by side")
    proxy.add_argument("--budget", action="store_true",
                       help="also measure (b) with a daily budget for its tenant (nothing reaches it): side by side")
    proxy.add_argument("--traces", action="store_true",
                       help="add gateway (t): (b) with every request traced, spans sent to an OTLP sink")
    cache = sub.add_parser("cache", help="cache layer latency, L1 throughput, L2 search time")
    cache.add_argument("--rounds", type=int, default=3)
    cache.add_argument("--miss-count", type=int, default=40, help="unique prompts per round")
    cache.add_argument("--hit-count", type=int, default=300, help="repeated requests per round and layer")
    cache.add_argument("--pair-sets", type=int, default=8, help="numbers per paraphrase pair per round")
    cache.add_argument("--seconds", type=float, default=3.0, help="length of one throughput round")
    cache.add_argument("--search-sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    cache.add_argument("--queries", type=int, default=300, help="random queries per index size")
    fresh = sub.add_parser("new-prompts", help="defaults (L2 on) with every prompt new, vs direct and cache off")
    fresh.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    fresh.add_argument("--rounds", type=int, default=3)
    fresh.add_argument("--seconds", type=float, default=3.0)
    fresh.add_argument("--warmup-seconds", type=float, default=1.0)
    fresh.add_argument("--baseline", type=Path, action="append", default=[], metavar="CHECKOUT",
                       help="also run the defaults gateway from another checkout (a git worktree of an older "
                            "commit) in the same rounds (repeatable)")
    fresh.add_argument("--exact-only", action="store_true",
                       help="also run the gateway with the exact cache only (SEMANTIC_CACHE_ENABLED=false) in the "
                            "same rounds: what L0/L1 cost and what L2 adds")
    counted = sub.add_parser("instructions", help="instructions per request in a worker, under callgrind")
    counted.add_argument("--requests", type=int, default=300, help="requests counted per tree and kind")
    counted.add_argument("--warmup", type=int, default=100, help="requests sent first, not counted")
    counted.add_argument("--baseline", type=Path, action="append", default=[], metavar="CHECKOUT",
                         help="also count another checkout (a git worktree of an older commit) (repeatable)")
    for sub_parser in (proxy, cache, fresh):
        sub_parser.add_argument("--latency", type=float, default=0.05, help="mock upstream latency (seconds)")
        sub_parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per gateway")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started_at = time.monotonic()
    if args.mode == "proxy":
        proxy_mode(args)
    elif args.mode == "new-prompts":
        from tools.bench_new_prompts import new_prompts_mode

        new_prompts_mode(args)
    elif args.mode == "instructions":
        from tools.bench_instructions import instructions_mode

        instructions_mode(args)
    else:
        cache_mode(args)
    log(f"done in {time.monotonic() - started_at:.0f}s")


if __name__ == "__main__":
    main()
