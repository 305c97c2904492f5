"""Settings.from_env with explicit environments: defaults, parsing, one error naming every bad variable."""

from __future__ import annotations

import pytest

from app.config import ENV_VARS, ConfigError, Settings


def settings(**env: str) -> Settings:
    return Settings.from_env(env, dotenv=False)


def config_error(**env: str) -> str:
    with pytest.raises(ConfigError) as info:
        settings(**env)
    return str(info.value)


def test_empty_environment_gives_the_documented_defaults() -> None:
    """With nothing set, every setting has the contract's default."""
    s = settings()
    assert s.port == 8080
    assert s.web_concurrency == 2
    assert s.worker_connections == 1000
    assert s.graceful_timeout == 120
    assert s.target_url == "https://api.deepseek.com"
    assert s.upstream_api_keys == ()
    assert s.upstream_max_retries == 3
    assert (s.upstream_backoff_factor, s.upstream_backoff_max) == (0.5, 8.0)
    assert (s.upstream_connect_timeout, s.upstream_read_timeout) == (5.0, 120.0)
    assert s.max_body_bytes == 10485760
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.auth_disabled is False
    assert s.admin_api_key is None
    assert (s.rate_limit_rpm, s.rate_limit_tpm, s.rate_limit_concurrency) == (0, 0, 0)
    assert s.rate_limit_fail_closed is False
    assert s.embedding_provider == "local"
    assert s.semantic_cache_enabled is True
    assert s.semantic_max_temperature == 0.7
    assert s.cache_ttl_seconds == 86400
    assert (s.local_cache_size, s.local_cache_max_bytes) == (1024, 67108864)
    assert s.log_level == "INFO"


def test_values_are_parsed_into_their_types() -> None:
    """Integers, numbers, booleans, lists and URLs come out typed and normalised."""
    s = settings(
        PORT="9000", UPSTREAM_MAX_RETRIES="0", UPSTREAM_READ_TIMEOUT="0.5", AUTH_DISABLED="TRUE",
        RATE_LIMIT_FAIL_CLOSED="off", UPSTREAM_API_KEYS=" k1 , k2,,", TARGET_URL="http://127.0.0.1:9/v1/",
        TRUSTED_PROXIES="10.0.0.0/8, 127.0.0.1", LOG_LEVEL="debug", SEMANTIC_CACHE_THRESHOLD="0.9",
        REDIS_URL="rediss://cache:6380/1", EMBEDDING_PROVIDER="OpenAI", EMBEDDING_URL="http://e:1",
        EMBEDDING_MODEL="m",
    )
    assert s.port == 9000
    assert s.upstream_max_retries == 0
    assert s.upstream_read_timeout == 0.5
    assert s.auth_disabled is True
    assert s.rate_limit_fail_closed is False
    assert s.upstream_api_keys == ("k1", "k2")
    assert s.target_url == "http://127.0.0.1:9/v1"
    assert s.trusted_proxies == ("10.0.0.0/8", "127.0.0.1")
    assert s.log_level == "DEBUG"
    assert s.semantic_cache_threshold == 0.9
    assert s.redis_url == "rediss://cache:6380/1"
    assert s.embedding_provider == "openai"


def test_one_error_names_every_bad_variable() -> None:
    """Several bad settings are reported together, each by name, so one fix round is enough."""
    message = config_error(
        PORT="eighty", UPSTREAM_MAX_RETRIES="lots", UPSTREAM_READ_TIMEOUT="nan", REDIS_URL="http://redis:6379",
        AUTH_DISABLED="maybe", TARGET_URL="ftp://x", TRUSTED_PROXIES="10.0.0.0/8,not-a-net",
        SEMANTIC_CACHE_THRESHOLD="1.5", MAX_BODY_BYTES="0", LOG_LEVEL="loud",
    )
    for name in ("PORT", "UPSTREAM_MAX_RETRIES", "UPSTREAM_READ_TIMEOUT", "REDIS_URL", "AUTH_DISABLED",
                 "TARGET_URL", "TRUSTED_PROXIES", "SEMANTIC_CACHE_THRESHOLD", "MAX_BODY_BYTES", "LOG_LEVEL"):
        assert name in message, name
    assert "'lots'" in message  # a harmless value is shown, to help the operator


@pytest.mark.parametrize(("name", "value"), [
    ("UPSTREAM_MAX_RETRIES", "11"),
    ("UPSTREAM_MAX_RETRIES", "-1"),
    ("PORT", "70000"),
    ("UPSTREAM_CONNECT_TIMEOUT", "0"),
    ("SEMANTIC_MAX_TEMPERATURE", "3"),
    ("WEB_CONCURRENCY", "0"),
    ("UPSTREAM_BACKOFF_FACTOR", "inf"),
    ("TARGET_URL", "https://api.example.com/?debug=1"),  # paths are appended: a query would swallow them
    ("TARGET_URL", "https://api.example.com:99999"),
])
def test_out_of_range_values_are_refused(name: str, value: str) -> None:
    """A value of the right type but outside its range is an error naming the variable."""
    assert name in config_error(**{name: value})


def test_deepseek_api_key_is_one_more_upstream_key() -> None:
    """DEEPSEEK_API_KEY is added to UPSTREAM_API_KEYS, and not twice when already listed."""
    assert settings(UPSTREAM_API_KEYS="a,b", DEEPSEEK_API_KEY="c").upstream_api_keys == ("a", "b", "c")
    assert settings(UPSTREAM_API_KEYS="a,c", DEEPSEEK_API_KEY="c").upstream_api_keys == ("a", "c")
    assert settings(DEEPSEEK_API_KEY="only").upstream_api_keys == ("only",)


def test_empty_value_means_unset() -> None:
    """An empty or blank variable takes the default instead of failing to parse."""
    s = settings(PORT="", UPSTREAM_MAX_RETRIES="   ", AUTH_DISABLED="", ADMIN_API_KEY="", DEEPSEEK_API_KEY=" ")
    assert s == Settings()


def test_remote_embeddings_need_their_url_and_model() -> None:
    """EMBEDDING_PROVIDER=openai without EMBEDDING_URL/EMBEDDING_MODEL is refused, naming both."""
    message = config_error(EMBEDDING_PROVIDER="openai")
    assert "EMBEDDING_URL" in message and "EMBEDDING_MODEL" in message
    assert settings(EMBEDDING_PROVIDER="openai", SEMANTIC_CACHE_ENABLED="false").embedding_provider == "openai"


def test_secret_values_are_never_echoed() -> None:
    """A bad secret-named setting is named, but its value never appears in the error."""
    secret = "/nonexistent/sk-secret-do-not-print"
    message = config_error(GATEWAY_KEYS_FILE=secret, PORT="x")
    assert "GATEWAY_KEYS_FILE" in message
    assert secret not in message and "sk-secret" not in message


def test_passwords_inside_bad_urls_are_never_echoed() -> None:
    """A bad REDIS_URL or TARGET_URL is named and shown, with the credentials it carries masked."""
    message = config_error(REDIS_URL="ftp://:hunter2-redis@cache:6379/0", TARGET_URL="https://user:hunter2-up@")
    assert "REDIS_URL" in message and "TARGET_URL" in message
    assert "hunter2" not in message
    assert "ftp://<hidden>@cache:6379/0" in message
    message = config_error(REDIS_URL="ftp://:s3cr/et@cache:6379/0", TARGET_URL="ftp://user:p@ss@host")
    assert "s3cr" not in message and "et@" not in message and "ss@" not in message


def test_every_declared_variable_is_read() -> None:
    """Each name in ENV_VARS changes the settings (none is declared but ignored), checked by a bad value."""
    ignored = []
    for name in ENV_VARS:
        if name in ("UPSTREAM_API_KEYS", "DEEPSEEK_API_KEY", "GATEWAY_API_KEYS", "ADMIN_API_KEY", "EMBEDDING_API_KEY",
                    "EMBEDDING_MODEL", "PROMETHEUS_MULTIPROC_DIR", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER"):
            continue  # free text: no value is invalid (the last two are the OpenTelemetry SDK's to read)
        try:
            settings(**{name: "\x00not valid\x00"})
        except ConfigError as exc:
            assert name in str(exc)
        else:
            ignored.append(name)
    assert ignored == []


def test_redis_budget_and_burst_settings() -> None:
    """REDIS_REQUEST_BUDGET and RATE_LIMIT_BURST are read, and a burst outside (0, 1] is refused."""
    settings = Settings.from_env({"REDIS_REQUEST_BUDGET": "0.25", "RATE_LIMIT_BURST": "0.5"})
    assert settings.redis_request_budget == 0.25 and settings.rate_limit_burst == 0.5
    assert Settings.from_env({}).rate_limit_burst == 0.1
    for bad in ("0", "1.5", "-1"):
        with pytest.raises(ConfigError, match="RATE_LIMIT_BURST"):
            Settings.from_env({"RATE_LIMIT_BURST": bad})


def test_cors_origins_are_checked_and_normalised() -> None:
    """CORS_ALLOW_ORIGINS: origins lower-cased without a trailing slash, `*` kept; a path or a bare host is refused."""
    s = settings(CORS_ALLOW_ORIGINS="https://App.Example.com/, http://127.0.0.1:3000,*")
    assert s.cors_allow_origins == ("https://app.example.com", "http://127.0.0.1:3000", "*")
    for bad in ("app.example.com", "https://a.example/x", "ftp://a.example", "https://:80"):
        with pytest.raises(ConfigError, match="CORS_ALLOW_ORIGINS"):
            settings(CORS_ALLOW_ORIGINS=bad)
