#!/usr/bin/env bash
# Make sure a Redis answers at REDIS_URL; start a local, memory-only redis-server when none does.
set -euo pipefail
url="${REDIS_URL:-}"
if [[ -z "$url" && -f .env && -x .venv/bin/python ]]; then
  # .env parsed as the gateway parses it (inline comments, quotes), not with grep.
  url=$(.venv/bin/python tools/dotenv_export.py .env REDIS_URL)
fi
url="${url:-redis://127.0.0.1:6379/0}"
hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"
[[ "$port" == "$hostport" ]] && port=6379

answers() {
  if command -v redis-cli >/dev/null 2>&1; then
    [[ "$(redis-cli -h "$host" -p "$port" ping 2>/dev/null)" == "PONG" ]]
  else
    (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && read -r -t 2 reply <&3 && [[ "$reply" == +PONG* ]]) 2>/dev/null
  fi
}

if answers; then
  echo "redis: answering at $host:$port"
  exit 0
fi
if [[ "$host" != "127.0.0.1" && "$host" != "localhost" ]]; then
  echo "redis: nothing answers at $host:$port (REDIS_URL). Start it, or point REDIS_URL at one that runs." >&2
  exit 1
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis: nothing answers at $host:$port and redis-server is not installed." >&2
  echo "       Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)," >&2
  echo "       or set REDIS_URL to a Redis you have." >&2
  exit 1
fi
echo "redis: starting a local memory-only redis-server on 127.0.0.1:$port"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --logfile "${TMPDIR:-/tmp}/gateway-redis-$port.log"
for _ in $(seq 1 50); do
  answers && { echo "redis: up"; exit 0; }
  sleep 0.1
done
echo "redis: redis-server did not come up; see ${TMPDIR:-/tmp}/gateway-redis-$port.log" >&2
exit 1
