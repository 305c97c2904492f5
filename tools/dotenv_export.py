"""Print `export NAME=value` lines for the settings in `.env` that the environment does not already set.

The shell scripts behind `make run` need a few settings (PORT, REDIS_URL, the key variables) before the
gateway starts. Reading `.env` with grep/cut kept inline comments (`PORT=8080   # listen port`) as part of
the value; python-dotenv parses the file exactly as the gateway itself does (app/config.py), so the
scripts and the gateway always agree. The environment wins, as it does in the gateway.
"""

from __future__ import annotations

import os
import re
import shlex
import sys

from dotenv import dotenv_values

_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # what `export` accepts (str.isidentifier takes "CAFÉ")


def exports(path: str) -> list[str]:
    """Shell-quoted export lines for `path`'s values not already in the environment."""
    if not os.path.isfile(path):
        return []
    values = dotenv_values(path)
    return [
        f"export {name}={shlex.quote(value)}"
        for name, value in values.items()
        if value is not None and _SHELL_NAME.fullmatch(name) and name not in os.environ
    ]


def main(argv: list[str]) -> None:
    """`dotenv_export.py [FILE]` prints export lines; `dotenv_export.py FILE NAME` prints NAME's raw value."""
    path = argv[0] if argv else ".env"
    if len(argv) > 1:
        value = dotenv_values(path).get(argv[1]) if os.path.isfile(path) else None
        print(value or "")
    else:
        print("\n".join(exports(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
