"""Write the settings' documentation from their one table (`Settings` in app/config.py): `.env.example` and the
table in README.md's "Configuration".

    python tools/settings_docs.py           # rewrite both
    python tools/settings_docs.py --check   # exit 1 naming the files that are out of date

tests/unit/test_settings_docs.py fails when either file differs from what this writes, so a setting is added in
app/config.py alone and documented by running this.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from app.config import VARIABLES, Variable  # noqa: E402

ENV_EXAMPLE = ROOT / ".env.example"
README = ROOT / "README.md"
TABLE_START = "<!-- settings table: written by tools/settings_docs.py from app/config.py, do not edit by hand -->"
TABLE_END = "<!-- end of settings table -->"
_ENV_HEADER = """\
# G-AIGateway settings. Copy to .env (read at start; the environment wins) and fill in what you need.
# An empty value means unset. Durations are seconds, sizes bytes. See README.md, "Configuration".
# Written by tools/settings_docs.py from app/config.py: change a setting there, then run it.
"""
_COMMENT_COLUMN = 32


def _rows(var: Variable) -> list[tuple[str, str, str]]:
    """(name, value as .env writes it, help) for the variable and the one it may take one more value from."""
    value = _env_value(var.default)
    rows = [(var.name, value, f"{var.help}; empty: {var.shown}" if var.shown and not value else var.help)]
    if var.one_more:
        rows.append((var.one_more[0], "", var.one_more[1]))
    return rows


def _env_value(default: object) -> str:
    if default is None:
        return ""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, tuple):
        return ",".join(default)
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def env_example() -> str:
    """`.env.example`: every variable with its default (so the file parses to the defaults), by section."""
    lines = [_ENV_HEADER.rstrip("\n")]
    for var in VARIABLES:
        if var.section:
            lines += ["", f"# --- {var.section} ---"]
        for name, value, help_text in _rows(var):
            assignment = f"{name}={value}"
            pad = max(_COMMENT_COLUMN, len(assignment) + 2)
            lines.append(f"{assignment.ljust(pad)}# {help_text.replace('`', '')}")
    return "\n".join(lines) + "\n"


def readme_table() -> str:
    """The README's table of settings, between its two marker comments."""
    lines = [TABLE_START, "| name | meaning | default |", "|---|---|---|"]
    for var in VARIABLES:
        (name, value, _), *more = _rows(var)
        lines.append(f"| `{name}` | {var.help} | {var.shown or value or '—'} |")
        lines += [f"| `{name}` | {help_text} | {value or '—'} |" for name, value, help_text in more]
    lines.append(TABLE_END)
    return "\n".join(lines)


def readme_with_table(readme: str) -> str:
    """README.md's text with its settings table replaced by the current one."""
    start, end = readme.index(TABLE_START), readme.index(TABLE_END) + len(TABLE_END)
    return readme[:start] + readme_table() + readme[end:]


def main(argv: list[str]) -> int:
    wanted = {ENV_EXAMPLE: env_example(), README: readme_with_table(README.read_text(encoding="utf-8"))}
    stale = [path for path, text in wanted.items() if path.read_text(encoding="utf-8") != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python tools/settings_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path], encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
