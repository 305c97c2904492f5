"""Manage the gateway's run-time client keys through its admin API (`/admin/keys`).

    export GATEWAY_URL=http://127.0.0.1:8080 ADMIN_API_KEY=...
    python tools/keys.py create --tenant acme [--name ci] [--rpm 60] [--tpm 100000] [--concurrency 4]
                                [--model deepseek-chat ...] [--expires-in SECONDS | --expires-at UNIX]
    python tools/keys.py list [--tenant acme]
    python tools/keys.py update KEY_ID [--name ...] [--rpm ...] [--model ...] [--expires-at UNIX]
    python tools/keys.py revoke KEY_ID
    python tools/keys.py rotate KEY_ID [--grace SECONDS]

Prints the gateway's JSON answer. `create` and `rotate` print the new key: it is shown this once only.
The admin key is read from the environment (ADMIN_API_KEY), never from the command line, where `ps` would
show it. Exit status 1 with the gateway's error on stderr when the action is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlencode

import requests

TIMEOUT = (5, 30)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    admin_key = os.environ.get("ADMIN_API_KEY", "")
    if not admin_key:
        print("keys.py: set ADMIN_API_KEY (the gateway's admin key) in the environment", file=sys.stderr)
        return 2
    method, path, body = request_for(args)
    try:
        response = requests.request(method, args.url.rstrip("/") + path, json=body, timeout=TIMEOUT,
                                    headers={"Authorization": f"Bearer {admin_key}"})
    except requests.RequestException as exc:
        print(f"keys.py: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code >= 400:
        print(f"keys.py: HTTP {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    print(json.dumps(response.json(), indent=2))
    return 0


def request_for(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    if args.command == "list":
        return "GET", "/admin/keys" + (f"?{urlencode({'tenant': args.tenant})}" if args.tenant else ""), None
    if args.command == "create":
        return "POST", "/admin/keys", {"tenant": args.tenant, **settable(args)}
    if args.command == "update":
        return "PATCH", f"/admin/keys/{args.key_id}", settable(args)
    if args.command == "revoke":
        return "DELETE", f"/admin/keys/{args.key_id}", None
    return "POST", f"/admin/keys/{args.key_id}/rotate", {"grace_seconds": args.grace}


def settable(args: argparse.Namespace) -> dict[str, Any]:
    """The fields given on the command line, and only those (an update changes nothing else)."""
    body: dict[str, Any] = {}
    if args.name is not None:
        body["name"] = args.name
    limits = {name: getattr(args, name) for name in ("rpm", "tpm", "concurrency") if getattr(args, name) is not None}
    if limits:
        body["limits"] = limits
    if args.model:
        body["models"] = args.model
    if args.expires_in is not None:
        body["expires_at"] = time.time() + args.expires_in
    elif args.expires_at is not None:
        body["expires_at"] = args.expires_at
    return body


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description="Manage the gateway's run-time client keys.")
    top.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"),
                     help="the gateway (default: $GATEWAY_URL or http://127.0.0.1:8080)")
    commands = top.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="issue a key (printed once)")
    create.add_argument("--tenant", required=True)
    update = commands.add_parser("update", help="change a key's name, limits, models or expiry")
    update.add_argument("key_id")
    for sub in (create, update):
        sub.add_argument("--name")
        sub.add_argument("--rpm", type=int)
        sub.add_argument("--tpm", type=int)
        sub.add_argument("--concurrency", type=int)
        sub.add_argument("--model", action="append", help="a model the key may use (repeat; default: every model)")
        expiry = sub.add_mutually_exclusive_group()
        expiry.add_argument("--expires-in", type=float, metavar="SECONDS")
        expiry.add_argument("--expires-at", type=float, metavar="UNIX_SECONDS")
    listing = commands.add_parser("list", help="list keys (static ones included, read-only)")
    listing.add_argument("--tenant")
    revoke = commands.add_parser("revoke", help="revoke a key everywhere (within a second)")
    revoke.add_argument("key_id")
    rotate = commands.add_parser("rotate", help="a new secret for a key (printed once)")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", type=int, default=0, metavar="SECONDS",
                        help="how long the old secret keeps working (default 0)")
    return top


if __name__ == "__main__":
    sys.exit(main())
