"""`make run`'s scripts read `.env` through tools/dotenv_export.py: values must match what the gateway reads."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from app.config import _read_dotenv

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "dotenv_export.py"

DOTENV = """\
PORT=8080                       # listen port
REDIS_URL=redis://127.0.0.1:6390/0   # comment after a URL
UPSTREAM_API_KEYS=              # empty: unset
QUOTED="a # not a comment"
SET_IN_ENV=from-file
CAFÉ=not-a-shell-name
"""


def run_tool(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", **(env_extra or {})}
    done = subprocess.run(
        [sys.executable, str(TOOL), str(tmp_path / ".env"), *args],
        capture_output=True, text=True, env=env, check=True, timeout=30,
    )
    return done.stdout


def test_exports_match_what_the_gateway_reads(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(DOTENV)
    out = run_tool(tmp_path, env_extra={"SET_IN_ENV": "from-env"})
    exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in out.splitlines())
    gateway = _read_dotenv(tmp_path / ".env")
    assert exported["PORT"] == gateway["PORT"] == "8080"
    assert exported["REDIS_URL"] == "redis://127.0.0.1:6390/0"
    assert exported["UPSTREAM_API_KEYS"] == ""
    assert exported["QUOTED"] == "a # not a comment"
    assert "SET_IN_ENV" not in exported  # the environment wins, as in the gateway
    assert "CAFÉ" not in exported  # `export` would fail on it and stop `make run`


def test_single_value_lookup(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(DOTENV)
    assert run_tool(tmp_path, "REDIS_URL").strip() == "redis://127.0.0.1:6390/0"
    assert run_tool(tmp_path, "NOT_THERE").strip() == ""
