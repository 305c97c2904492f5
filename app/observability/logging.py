"""Logging configured once, as JSON lines, for the app and gunicorn alike.

gunicorn.conf.py passes `logging_config()` as `logconfig_dict`; `create_app` applies it when the app runs
without gunicorn (tests, scripts).
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A dictConfig for JSON lines on stderr (12-factor: the platform collects them)."""
    skip_unlogged_record_fields()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": "app.observability.json_lines.JsonLines",  # python-json-logger's, quicker per access line
                "fmt": JSON_FORMAT,
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            }
        },
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            "app": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gateway.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gateway.audit": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }


def skip_unlogged_record_fields() -> None:
    """Records without the caller's file and line, thread and process: no line shows them (the JSON lines carry
    `JSON_FORMAT`'s fields and the logged dict or `extra`), and finding the caller walks the stack on every line,
    the access log's included. The switches are the ones the logging HOWTO's "Optimization" section names."""
    logging._srcfile = None  # noqa: SLF001 - documented there: "set logging._srcfile to None"
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def configure_logging(level: str) -> None:
    """Apply the JSON config unless it is in place already: gunicorn applied it (it owns the handlers then), or an
    earlier app in this process did. The app's logger having handlers is what tells."""
    if logging.getLogger("app").handlers:
        return
    logging.config.dictConfig(logging_config(level))
