"""Backends and their keys, from the settings or the YAML backends file (UPSTREAMS_FILE); every field is checked
at start, and an error says where without quoting a key."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.config import ConfigError, http_base_url, read_yaml_file


def key_fingerprint(secret: str) -> str:
    """A short, stable, non-reversible id for logs and metrics: never the key itself."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class UpstreamKey:
    secret: str = field(repr=False)
    key_id: str
    weight: float = 1.0


@dataclass(frozen=True)
class Backend:
    name: str
    base_url: str
    keys: tuple[UpstreamKey, ...]
    weight: float = 1.0
    models: tuple[str, ...] = ()  # empty: serves any model
    model_map: Mapping[str, str] = field(default_factory=dict)

    def serves(self, model: str | None) -> bool:
        return not self.models or model in self.models or model in self.model_map

    def upstream_model(self, model: str) -> str:
        return self.model_map.get(model, model)


class PoolConfigError(ConfigError):
    """The backends description is unusable; the message says where."""


def backends_from_settings(target_url: str, keys: tuple[str, ...], upstreams_file: str | None) -> list[Backend]:
    """`UPSTREAMS_FILE` when given, else one backend from `TARGET_URL` + `UPSTREAM_API_KEYS`."""
    if upstreams_file:
        return load_backends_file(Path(upstreams_file))
    return [Backend(name="default", base_url=target_url, keys=_keys_or_anonymous([_make_key(k) for k in keys]))]


def _keys_or_anonymous(keys: list[UpstreamKey]) -> tuple[UpstreamKey, ...]:
    """A backend without keys (a local vLLM or Ollama) is called without an Authorization header."""
    return tuple(keys) or (UpstreamKey(secret="", key_id="anonymous"),)


def _make_key(secret: str, weight: float = 1.0) -> UpstreamKey:
    return UpstreamKey(secret=secret, key_id=key_fingerprint(secret), weight=weight)


def load_backends_file(path: Path) -> list[Backend]:
    """Parse the YAML backends file (see README, "Several upstreams"); every field is checked here, at start."""
    doc = read_yaml_file(path, "UPSTREAMS_FILE", PoolConfigError)
    items = doc.get("backends") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise PoolConfigError(f"UPSTREAMS_FILE {path}: expected a non-empty 'backends' list")
    backends: list[Backend] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        backend = _parse_backend(path, index, item)
        # Metrics, logs and the admin API tell backends apart by name: two of one name would be confused.
        if backend.name in seen:
            raise PoolConfigError(f"UPSTREAMS_FILE {path}: backends[{index}]: the name {backend.name!r} is "
                                  f"already used by backends[{seen[backend.name]}]; backend names must be unique")
        seen[backend.name] = index
        backends.append(backend)
    return backends


def _parse_backend(path: Path, index: int, item: Any) -> Backend:
    where = f"UPSTREAMS_FILE {path}: backends[{index}]"
    if not isinstance(item, dict):
        raise PoolConfigError(f"{where}: expected a mapping with a 'url'")
    name = item.get("name")
    if name is None:
        name = f"backend{index}"
    if not isinstance(name, str) or not name.strip():
        raise PoolConfigError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name!r})"
    return Backend(
        name=name,
        base_url=_base_url(item.get("url"), where),
        keys=_parse_keys(item, where),
        weight=_weight(item.get("weight", 1.0), f"{where}: 'weight'"),
        models=_model_names(item.get("models"), where),
        model_map=_model_map(item.get("model_map"), where),
    )


def _base_url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PoolConfigError(f"{where}: needs a 'url' (http:// or https://)")
    try:
        return http_base_url(value)
    except ValueError as exc:
        raise PoolConfigError(f"{where}: 'url': {exc}") from None


def _weight(value: Any, where: str) -> float:
    """A finite number > 0 (a numeric string too: YAML 1.1 reads `1e3` as a string)."""
    if not isinstance(value, bool) and isinstance(value, int | float | str):
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if math.isfinite(weight) and weight > 0:
            return weight
    raise PoolConfigError(f"{where} must be a number greater than 0, got {value!r}")


def _parse_keys(item: dict[str, Any], where: str) -> tuple[UpstreamKey, ...]:
    """Left out: the backend is called without a key. Given: a non-empty list. Keys are never quoted."""
    if "keys" not in item:
        return _keys_or_anonymous([])
    raw_keys = item["keys"]
    if not isinstance(raw_keys, list) or not raw_keys:
        raise PoolConfigError(f"{where}: 'keys' must be a non-empty list (leave it out for a backend without keys)")
    keys: list[UpstreamKey] = []
    for i, raw in enumerate(raw_keys):
        if isinstance(raw, str) and raw.strip():
            keys.append(_make_key(raw))
        elif isinstance(raw, dict) and isinstance(raw.get("key"), str) and raw["key"].strip():
            keys.append(_make_key(raw["key"], _weight(raw.get("weight", 1.0), f"{where}: 'keys[{i}].weight'")))
        else:
            raise PoolConfigError(f"{where}: 'keys[{i}]' must be a non-empty string or {{key, weight}}")
    return tuple(keys)


def _model_names(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise PoolConfigError(f"{where}: 'models' must be a list of model names (strings)")
    return tuple(value)


def _model_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()
    ):
        raise PoolConfigError(f"{where}: 'model_map' must map model names to model names (strings)")
    return dict(value)
