"""`.env.example` and README's settings table are written from the one table in app/config.py, and stay so."""

from __future__ import annotations

from dotenv import dotenv_values

from app.config import ENV_VARS, VARIABLES, Settings
from tools.settings_docs import ENV_EXAMPLE, README, env_example, readme_table, readme_with_table


def test_env_example_is_the_one_the_settings_table_writes() -> None:
    """.env.example lists exactly the declared variables (run `python tools/settings_docs.py` after a change)."""
    assert ENV_EXAMPLE.read_text(encoding="utf-8") == env_example(), "run python tools/settings_docs.py"


def test_readme_table_is_the_one_the_settings_table_writes() -> None:
    """README.md's Configuration table is the declared one (run `python tools/settings_docs.py` after a change)."""
    readme = README.read_text(encoding="utf-8")
    assert readme_table() in readme
    assert readme_with_table(readme) == readme, "run python tools/settings_docs.py"


def test_env_example_parses_to_the_defaults() -> None:
    """Copying .env.example to .env changes nothing: every value it shows is the default."""
    values = {k: v for k, v in dotenv_values(ENV_EXAMPLE).items() if v is not None}
    assert set(values) == set(ENV_VARS)
    assert Settings.from_env(values, dotenv=False) == Settings()


def test_every_variable_is_declared_once_with_help() -> None:
    """Names are unique, each has a help line, and each is its Settings field in upper case."""
    assert len(set(ENV_VARS)) == len(ENV_VARS)
    for var in VARIABLES:
        assert var.help.strip(), var.name
        assert var.name == var.field.upper()
