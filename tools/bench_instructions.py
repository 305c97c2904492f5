"""`tools/bench.py instructions`: what one request costs a gateway worker, in instructions, under callgrind.

Time on this machine's two shared cores drifts by more than the differences worth finding (a few percent of a
millisecond), so a before/after of the hot path is measured here in what does not drift: the user-space
instructions a gunicorn worker executes per request, counted by valgrind's callgrind. The same tree gives the
same count within about 0.5 % run to run, whatever else the machine is doing. Not counted: the kernel's share
(system calls; `strace -c` counts those) and time spent waiting.

Each tree (this checkout and every `--baseline`) runs under callgrind with one gevent worker in front of the mock
upstream, cache off and auth off (as `make bench`'s gateway (a)); one keep-alive client sends requests one at a
time. After a warm-up the worker's counters are read (`callgrind_control -e`), `--requests` more are sent, and the
counters read again. What the worker does meanwhile without requests (timers) is measured over an idle spell and
taken off.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from tests.support import PYTHON, Gateway, MockUpstream
from tools.bench import CHAT_PATH, ROOT, UPSTREAM_KEY, chat_body, checkout_rev, log, worker_pids

IDLE_SECONDS = 10.0
BODY = "Explain in two sentences why keep-alive connections matter for a reverse proxy."


def counted_gateway(root: Path, upstream: str) -> tuple[Gateway, int]:
    """gunicorn (one gevent worker) under callgrind, in `root`, in front of `upstream`; and its worker's pid."""
    env = {"PYTHONHASHSEED": "0", "TARGET_URL": upstream, "UPSTREAM_API_KEYS": UPSTREAM_KEY,
           "AUTH_DISABLED": "true", "CACHE_ENABLED": "false"}
    wrapper = ["valgrind", "--tool=callgrind", "--trace-children=yes", "--callgrind-out-file=/dev/null", PYTHON]
    gateway = Gateway(env, workers=1, timeout=300, root=root, wrapper=wrapper)
    workers = worker_pids(gateway.process.pid)
    if len(workers) != 1:
        gateway.stop()
        raise SystemExit(f"expected one worker under gunicorn {gateway.process.pid}, found {workers}")
    return gateway, workers[0]


def instructions(worker: int) -> int:
    """The worker's instructions so far."""
    return total_instructions(subprocess.run(["callgrind_control", "-e", str(worker)], capture_output=True,
                                             text=True, check=True).stdout)


def total_instructions(control_output: str) -> int:
    """The sum over every thread of `callgrind_control -e`'s counters (lines `Th <n> <count>`)."""
    counts = re.findall(r"^\s*Th\s+\d+\s+([\d,]+)\s*$", control_output, re.M)
    if not counts:
        raise SystemExit(f"callgrind_control printed no counters: {control_output[:300]!r}")
    return sum(int(count.replace(",", "")) for count in counts)


def send(port: int, body: str, count: int, stream: bool) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(count):
        connection.request("POST", CHAT_PATH, body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        data = answer.read()
        if answer.status != 200 or (stream and not data.rstrip().endswith(b"[DONE]")):
            raise SystemExit(f"the gateway answered {answer.status}: {data[:300]!r}")
    connection.close()


def per_request(gateway: Gateway, worker: int, body: str, args: argparse.Namespace, stream: bool) -> float:
    send(gateway.port, body, args.warmup, stream)
    before = instructions(worker)
    time.sleep(IDLE_SECONDS)
    idle_rate = (instructions(worker) - before) / IDLE_SECONDS
    before, started = instructions(worker), time.monotonic()
    send(gateway.port, body, args.requests, stream)
    spent, elapsed = instructions(worker) - before, time.monotonic() - started
    return (spent - idle_rate * elapsed) / args.requests


def instructions_mode(args: argparse.Namespace) -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    kinds = {"chat": (chat_body(BODY), False), "stream": (chat_body(BODY, stream=True), True)}
    trees = [("this tree", ROOT)] + [(f"at {checkout_rev(path)}", path) for path in args.baseline]
    counts: dict[tuple[str, str], float] = {}
    with ExitStack() as stack:
        mock = MockUpstream("--latency", "0")
        stack.callback(mock.stop)
        for name, root in trees:
            log(f"{name}: starting gunicorn under callgrind ...")
            gateway, worker = counted_gateway(root, mock.url)
            try:
                for kind, (body, stream) in kinds.items():
                    counts[(name, kind)] = per_request(gateway, worker, body, args, stream)
                    log(f"  {kind}: {counts[(name, kind)]:,.0f} instructions per request")
            finally:
                gateway.stop()
    print(f"\n### Instructions per request in one gateway worker (callgrind; cache off, auth off; "
          f"{args.requests} requests after {args.warmup})\n")
    print("| tree | " + " | ".join(f"{kind} | this tree against it" for kind in kinds) + " |")
    print("|---|" + "---:|---:|" * len(kinds))
    for name, _root in trees:
        cells = []
        for kind in kinds:
            mine, this = counts[(name, kind)], counts[("this tree", kind)]
            cells += [f"{mine:,.0f}", "" if name == "this tree" else f"{100.0 * (this - mine) / mine:+.1f} %"]
        print(f"| {name} | " + " | ".join(cells) + " |")
