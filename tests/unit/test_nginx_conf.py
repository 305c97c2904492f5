"""deploy/nginx.conf: SSE-safe proxying to gunicorn and limits that match the settings (`nginx -t` on it runs in
tests/integration/test_config_tools.py).

`render_nginx_conf` turns the production-shaped file into one an unprivileged process can run on loopback;
tests that put nginx in front of a real gunicorn can import it from here.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO_ROOT / "deploy" / "nginx.conf"
# The contract's MAX_BODY_BYTES and UPSTREAM_READ_TIMEOUT defaults, used when app.config cannot be imported.
CONTRACT_MAX_BODY_BYTES = 10485760
CONTRACT_UPSTREAM_READ_TIMEOUT = 120.0


def render_nginx_conf(dest_dir: Path, listen_port: int, upstream_port: int) -> Path:
    """Copy deploy/nginx.conf into `dest_dir` listening on 127.0.0.1:`listen_port`, proxying to `upstream_port`.

    pid, logs and temp files move under `dest_dir`. Each replaced text must occur in the file, so renaming a
    path there breaks this loudly instead of leaving a root-only path in the copy.
    """
    text = NGINX_CONF.read_text(encoding="utf-8")
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{listen_port};",
        "server 127.0.0.1:8080": f"server 127.0.0.1:{upstream_port}",
        "/run/nginx.pid": f"{dest_dir}/nginx.pid",
        "/var/log/nginx/": f"{dest_dir}/log/",
        "/var/lib/nginx/": f"{dest_dir}/tmp/",
    }
    for old, new in replacements.items():
        if old not in _directives(text):
            raise ValueError(f"deploy/nginx.conf no longer contains {old!r}; update render_nginx_conf")
        text = text.replace(old, new)
    # Started as root, nginx runs its workers as the `user` directive's user (`nobody` when there is none),
    # who cannot enter a private temp dir like pytest's: the copy runs them as root instead. Unprivileged,
    # nginx ignores `user` (with a warning), so the copy has none.
    text = re.sub(r"^\s*user\s+[^;]*;[^\n]*\n", "", text, flags=re.MULTILINE)
    if os.geteuid() == 0:
        text = "user root;\n" + text
    (dest_dir / "log").mkdir(parents=True, exist_ok=True)
    (dest_dir / "tmp").mkdir(parents=True, exist_ok=True)
    out = dest_dir / "nginx.conf"
    out.write_text(text, encoding="utf-8")
    return out


def nginx_binary() -> str | None:
    """The nginx executable; Debian puts it in /usr/sbin, which an unprivileged PATH often lacks."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None


def _directives(text: str) -> str:
    """The config without comments (no directive here has a `#` inside a quoted string)."""
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _size_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match, value
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]


def _seconds(value: str) -> int:
    match = re.fullmatch(r"(\d+)(s|m)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def _settings_defaults() -> tuple[int, float]:
    try:
        from app.config import Settings
    except ImportError:  # the app package is written in parallel; the contract's values stand in
        return CONTRACT_MAX_BODY_BYTES, CONTRACT_UPSTREAM_READ_TIMEOUT
    return Settings().max_body_bytes, Settings().upstream_read_timeout


@pytest.fixture(scope="module")
def conf() -> str:
    return _directives(NGINX_CONF.read_text(encoding="utf-8"))


def _values(conf: str, directive: str) -> list[str]:
    return [m.strip() for m in re.findall(rf"^\s*{directive}\s+([^;]+);", conf, flags=re.MULTILINE)]


def test_streams_are_not_buffered(conf: str) -> None:
    """SSE chunks and request bodies pass straight through: both buffering directives are off."""
    assert _values(conf, "proxy_buffering") == ["off"]
    assert _values(conf, "proxy_request_buffering") == ["off"]


def test_upstream_connections_are_kept_alive(conf: str) -> None:
    """HTTP/1.1 with an empty Connection header to a keepalive upstream pointing at gunicorn."""
    upstream = re.search(r"upstream\s+gateway\s*\{([^}]*)\}", conf)
    assert upstream, "no `upstream gateway { ... }` block"
    assert "server 127.0.0.1:8080;" in upstream.group(1)
    assert int(_values(upstream.group(1), "keepalive")[0]) > 0
    assert _values(conf, "proxy_pass") == ["http://gateway"]
    assert _values(conf, "proxy_http_version") == ["1.1"]
    assert 'proxy_set_header Connection "";' in conf


def test_body_limit_equals_max_body_bytes(conf: str) -> None:
    """client_max_body_size is the settings' MAX_BODY_BYTES default, and the JSON 413 says so."""
    max_body_bytes, _ = _settings_defaults()
    assert max_body_bytes == CONTRACT_MAX_BODY_BYTES
    assert [_size_bytes(v) for v in _values(conf, "client_max_body_size")] == [max_body_bytes]
    assert re.search(rf"return 413 '[^']*{max_body_bytes}", conf)


def test_timeouts_outlast_the_upstream_read_timeout(conf: str) -> None:
    """nginx waits longer than the gateway does for a silent upstream, so the gateway answers first."""
    _, read_timeout = _settings_defaults()
    for directive in ("proxy_read_timeout", "proxy_send_timeout", "send_timeout"):
        values = [_seconds(v) for v in _values(conf, directive)]
        assert values and all(v > read_timeout for v in values), directive


def test_request_id_and_forwarding_headers(conf: str) -> None:
    """X-Request-ID is kept or generated; X-Forwarded-For/-Proto and Host reach the gateway."""
    request_id_map = re.search(r"map\s+\$http_x_request_id\s+\$req_id\s*\{([^}]*)\}", conf)
    assert request_id_map, "no `map $http_x_request_id $req_id`"
    assert re.search(r"default\s+\$http_x_request_id;", request_id_map.group(1))
    assert re.search(r'""\s+\$request_id;', request_id_map.group(1))
    headers = dict(re.findall(r"^\s*proxy_set_header\s+(\S+)\s+([^;]+);", conf, flags=re.MULTILINE))
    assert headers["X-Request-ID"] == "$req_id"
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert headers["X-Forwarded-Proto"] == "$scheme"
    assert headers["Host"] == "$host"


def test_render_moves_every_root_only_path(tmp_path: Path) -> None:
    """The rendered copy listens on loopback and keeps nothing under /run, /var/log or /var/lib."""
    rendered = render_nginx_conf(tmp_path, 18080, 18081).read_text(encoding="utf-8")
    body = _directives(rendered)
    assert "listen 127.0.0.1:18080;" in body and "server 127.0.0.1:18081;" in body
    for root_only in ("/run/", "/var/log/", "/var/lib/", "listen 80;"):
        assert root_only not in body
    users = _values(body, "user")
    assert users == (["root"] if os.geteuid() == 0 else []), "workers must be able to write the temp dir"
