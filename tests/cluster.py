"""A real local Redis Cluster (three masters, no replicas) on loopback ports, for tests marked `cluster`."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from tests.support import declared, missing_tool

NODES = 3


def cluster_port() -> int:
    """A free port P with P + 10000 free too (the cluster bus), so P <= 55535."""
    while True:
        port = random.randint(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


class LocalCluster:
    """Three `redis-server --cluster-enabled yes` processes joined by `redis-cli --cluster create`."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gateway-cluster-"))
        self.ports = [cluster_port() for _ in range(NODES)]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        declared("redis", "a Redis Cluster")
        for port in self.ports:
            self.processes.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--cluster-enabled", "yes",
                 "--cluster-config-file", str(self.dir / f"nodes-{port}.conf"), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        for port in self.ports:
            self._wait(lambda port=port: self.node(port).ping(), f"redis-server on {port}")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        for port in self.ports:
            self._wait(lambda port=port: self.node(port).cluster("INFO").get("cluster_state") == "ok",
                       f"cluster_state:ok on {port}")

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def nodes(self) -> list[redis.Redis]:
        return [self.node(port) for port in self.ports]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _wait(check: object, what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{what} not ready after {timeout}s")


@contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    """A started cluster, always torn down (also when starting it failed half-way)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        missing_tool("redis-server and redis-cli are needed for a local Redis Cluster")
    cluster = LocalCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# Parameters of a `client` fixture that runs a Redis-level test on the test Redis and on a cluster.
STANDALONE_OR_CLUSTER = [pytest.param("standalone"), pytest.param("cluster", marks=pytest.mark.cluster)]


def standalone_or_cluster(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The body of such a fixture: the session's test Redis, or a client of the cluster at REDIS_CLUSTER_URL
    (skipped without it; tests/integration/test_cluster.py runs these variants against a cluster of its own)."""
    if request.param == "cluster":
        url = os.environ.get("REDIS_CLUSTER_URL")
        if not url:
            pytest.skip("REDIS_CLUSTER_URL is not set")
        cluster = RedisCluster.from_url(url, socket_timeout=2)
        yield cluster
        cluster.close()
        return
    yield request.getfixturevalue("redis_conn")
