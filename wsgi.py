"""WSGI entry point for gunicorn: `gunicorn -c gunicorn.conf.py wsgi:app`."""

import sys

from app import create_app
from app.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    # Exit code 3 is gunicorn's "worker failed to boot": the master stops instead of respawning forever.
    print(f"G-AIGateway cannot start: {exc}", file=sys.stderr, flush=True)
    sys.exit(3)
