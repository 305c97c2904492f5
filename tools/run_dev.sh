#!/usr/bin/env bash
# `make run`: start the gateway under gunicorn. Without an upstream key it starts the bundled mock upstream
# and points the gateway at it; without client keys it makes a local development key and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .run

# .env's settings, parsed as the gateway parses them (the environment wins).
eval "$(.venv/bin/python tools/dotenv_export.py .env)"
setting() { local name="$1"; printf '%s' "${!name:-}"; }

port="$(setting PORT)"; port="${port:-8080}"
metrics_port="$(setting METRICS_PORT)"; metrics_port="${metrics_port:-9090}"
mock_pid=""
cleanup() { [[ -n "$mock_pid" ]] && kill "$mock_pid" 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [[ -z "$(setting UPSTREAM_API_KEYS)$(setting DEEPSEEK_API_KEY)$(setting UPSTREAMS_FILE)" ]]; then
  mock_port="${MOCK_PORT:-9100}"
  .venv/bin/python tools/mock_upstream.py --host 127.0.0.1 --port "$mock_port" --latency 0.3 --chunk-delay 0.05 \
    > .run/mock-upstream.log 2>&1 &
  mock_pid=$!
  export TARGET_URL="http://127.0.0.1:$mock_port" UPSTREAM_API_KEYS="mock-upstream-key"
  cat <<BANNER
================================================================================
  NO UPSTREAM KEY CONFIGURED (UPSTREAM_API_KEYS / DEEPSEEK_API_KEY / UPSTREAMS_FILE)
  -> using the bundled MOCK upstream at $TARGET_URL : answers are fake.
  Set DEEPSEEK_API_KEY (or UPSTREAM_API_KEYS and TARGET_URL) in .env for a real provider.
================================================================================
BANNER
fi

if [[ -z "$(setting GATEWAY_API_KEYS)$(setting GATEWAY_KEYS_FILE)" && "$(setting AUTH_DISABLED)" != "true" ]]; then
  [[ -s .run/dev-client-key ]] || .venv/bin/python -c 'import secrets; print("gw-dev-" + secrets.token_urlsafe(24))' > .run/dev-client-key
  export GATEWAY_API_KEYS="dev:$(cat .run/dev-client-key)"
  echo "No client keys configured: using the local development key (tenant 'dev') in .run/dev-client-key:"
  echo "  $(cat .run/dev-client-key)"
fi

export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$PWD/.run/metrics}"
key="$(cat .run/dev-client-key 2>/dev/null || echo '<your client key>')"
cat <<HELP
Gateway on http://127.0.0.1:$port   (Ctrl-C stops it); metrics on http://127.0.0.1:$metrics_port/metrics
  curl http://127.0.0.1:$port/v1/chat/completions -H "Authorization: Bearer $key" \\
       -H 'Content-Type: application/json' \\
       -d '{"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hello!"}]}'
HELP
# Every setting checked first, with one message naming each bad one (gunicorn itself would stop on a bad
# WEB_CONCURRENCY with a traceback, before its config file runs).
.venv/bin/python -c 'from app.config import exit_if_invalid; exit_if_invalid()'
.venv/bin/gunicorn -c gunicorn.conf.py -b "127.0.0.1:$port" -b "127.0.0.1:$metrics_port" wsgi:app &
gunicorn_pid=$!
trap 'kill -TERM $gunicorn_pid 2>/dev/null; wait $gunicorn_pid; cleanup' INT TERM
wait "$gunicorn_pid"
