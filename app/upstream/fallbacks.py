"""Fallback chains: when a model cannot be served, the next model an operator named answers instead.

Rules come from `UPSTREAMS_FILE` (`fallbacks`, `context_window_fallbacks`, named as LiteLLM names them) and,
per tenant, from `GATEWAY_KEYS_FILE` (`fallbacks`, replacing the global rule of each model it names). A hop is
taken only when the current model failed in a way another model could fix, before any byte reached the client
(the chain wraps the step that ends with the answer's head), and within one deadline for the whole chain.

Nothing here runs while the first model answers: the chain is built only after a failure, so a configured rule
costs a request that succeeds nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.concurrency import deadline
from app.config import ConfigError, read_yaml_file
from app.errors import GatewayError, RateLimited, ServiceUnavailable, UpstreamTimeout, UpstreamUnreachable
from app.observability import metrics
from app.upstream.http import peeked_error

log = logging.getLogger(__name__)

# Why a model could not serve (the metric's `reason`). The first group moves along `fallbacks` always.
RATE_LIMITED = "rate_limited"  # every key answered 429 after the retries
SERVER_ERROR = "server_error"  # 5xx after the retries
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
COOLING_DOWN = "cooling_down"  # every key of the model resting after earlier 429s: nothing was sent
UNAVAILABLE = "unavailable"  # every key of the model refused by the upstream (401/403), until an operator acts
CONTEXT_WINDOW = "context_window"  # a 400 `context_length_exceeded`: only `context_window_fallbacks` move on it
# Moved on only by a rule that names them in `also_on`: another model may not help, or may cost more.
INSUFFICIENT_QUOTA = "insufficient_quota"  # 402, or a 429 `insufficient_quota`: the provider's credit ran out
CONTENT_POLICY = "content_policy"  # a 400 `content_policy_violation` / `content_filter`

ALWAYS = frozenset({RATE_LIMITED, SERVER_ERROR, TIMEOUT, UNREACHABLE, COOLING_DOWN, UNAVAILABLE})
NAMED = frozenset({INSUFFICIENT_QUOTA, CONTENT_POLICY})
CONTENT_POLICY_CODES = frozenset({"content_policy_violation", "content_filter"})
REFUSE_HEADER = "x-gateway-fallbacks"  # `none`: this request takes no fallback


class FallbackConfigError(ConfigError):
    """A fallback rule is unusable; the message says where."""


@dataclass(frozen=True)
class FallbackRule:
    """The models tried, in order, after one model failed; `also_on` adds the reasons only a rule may name."""

    models: tuple[str, ...]
    also_on: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FallbackRules:
    fallbacks: Mapping[str, FallbackRule] = field(default_factory=dict)
    context_window: Mapping[str, FallbackRule] = field(default_factory=dict)
    deadline_seconds: float = 60.0

    def __bool__(self) -> bool:
        return bool(self.fallbacks or self.context_window)

    def models(self) -> set[str]:
        """Every model a rule names, on either side: each must be served by some backend."""
        return rule_models(self.fallbacks) | rule_models(self.context_window)


def rule_models(rules: Mapping[str, FallbackRule]) -> set[str]:
    return {m for source, rule in rules.items() for m in (source, *rule.models)}


def load_fallback_rules(path: Path | None, deadline_seconds: float) -> FallbackRules:
    """The two maps of `UPSTREAMS_FILE` (both optional); no file, no rules."""
    if path is None:
        return FallbackRules(deadline_seconds=deadline_seconds)
    doc = read_yaml_file(path, "UPSTREAMS_FILE", FallbackConfigError)
    doc = doc if isinstance(doc, dict) else {}
    where = f"UPSTREAMS_FILE {path}"
    return FallbackRules(
        fallbacks=parse_rules(doc.get("fallbacks"), f"{where}: fallbacks"),
        context_window=parse_rules(doc.get("context_window_fallbacks"), f"{where}: context_window_fallbacks",
                                   also_on=False),
        deadline_seconds=deadline_seconds,
    )


def parse_rules(value: Any, where: str, *, also_on: bool = True) -> dict[str, FallbackRule]:
    """`{model: [next, ...]}`, LiteLLM's list of one-entry maps `[{model: [next, ...]}]`, or a rule as a map
    `{models: [next, ...], also_on: [insufficient_quota, content_policy]}` (where `also_on` is allowed)."""
    if value is None:
        return {}
    entries: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        entries = list(value.items())
    elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
        entries = [pair for item in value for pair in item.items()]
    else:
        raise FallbackConfigError(f"{where}: expected a map of model -> list of models")
    rules: dict[str, FallbackRule] = {}
    for source, target in entries:
        if not isinstance(source, str) or not source:
            raise FallbackConfigError(f"{where}: each rule is named by a model (a non-empty string)")
        if source in rules:
            raise FallbackConfigError(f"{where}: {source!r} has two rules")
        rules[source] = _rule(source, target, f"{where}.{source}", also_on)
    return rules


def _rule(source: str, value: Any, where: str, also_on: bool) -> FallbackRule:
    named: frozenset[str] = frozenset()
    if isinstance(value, dict) and also_on:
        unknown = set(value) - {"models", "also_on"}
        if unknown:
            raise FallbackConfigError(f"{where}: unknown field(s) {sorted(map(str, unknown))} (models, also_on)")
        raw_named = value.get("also_on") or []
        if not isinstance(raw_named, list) or not set(raw_named) <= NAMED:
            raise FallbackConfigError(f"{where}: 'also_on' lists any of {sorted(NAMED)}")
        named = frozenset(raw_named)
        value = value.get("models")
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        form = "a list of models, or {models: [...], also_on: [...]}" if also_on else "a list of models"
        raise FallbackConfigError(f"{where}: expected {form}")
    if source in value or len(set(value)) != len(value):
        raise FallbackConfigError(f"{where}: a model appears twice in its own chain")
    return FallbackRule(models=tuple(value), also_on=named)


# -- one request's chain ----------------------------------------------------------------------------------------


def failure_reason(outcome: Any, *, read_400: bool) -> str | None:
    """Why the model could not serve, as a reason another model might fix; None when it is the request's own
    fault (other 4xx) or not a failure. `outcome`: an UpstreamResult (its head arrived) or the GatewayError
    raised instead. A 400's small error body is read only when `read_400` (a rule could act on it); it is kept
    on the response, so it is still passed on if no hop is taken."""
    if isinstance(outcome, GatewayError):
        if isinstance(outcome, UpstreamTimeout):
            return TIMEOUT
        if isinstance(outcome, UpstreamUnreachable):
            return UNREACHABLE
        if isinstance(outcome, RateLimited) and outcome.code == "upstream_rate_limited":
            return COOLING_DOWN
        if isinstance(outcome, ServiceUnavailable) or outcome.code == "upstream_auth_failed":
            return UNAVAILABLE
        return None
    status = outcome.status
    if status == 402 or (status == 429 and outcome.final):
        return INSUFFICIENT_QUOTA  # the client (`_accept`) marks a 429 `insufficient_quota` final
    if status == 429:
        return RATE_LIMITED
    if status >= 500:
        return SERVER_ERROR
    if status == 400 and read_400:
        error = peeked_error(outcome.response)
        code = error.get("code") if error else None
        if code == "context_length_exceeded":
            return CONTEXT_WINDOW
        if code in CONTENT_POLICY_CODES:
            return CONTENT_POLICY
    return None


@dataclass
class Hop:
    source: str
    target: str
    reason: str
    status: int

    def as_log(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "reason": self.reason, "status": self.status}


class Chain:
    """One request's way along its rules: which model next, after which failure, until the deadline.

    `rules` is the global map with the tenant's own entries laid over it; `allowed(model)` says whether the
    tenant may use a model (and, for a model with its own limits, whether they admit one more request):
    a model it may not use is passed over.
    """

    def __init__(self, requested: str, rules: FallbackRules, tenant_rules: Mapping[str, FallbackRule],
                 deadline_at: float, allowed: Callable[[str], bool]) -> None:
        self.requested = requested
        self.model = requested
        # The tenant's rule for the model replaces the global one, an empty one too (no fallbacks for it).
        self.general = tenant_rules[requested] if requested in tenant_rules else rules.fallbacks.get(requested)
        self.context = rules.context_window.get(requested)
        self.deadline_at = deadline_at  # time.perf_counter() clock
        self.allowed = allowed
        self.tried = {requested}
        self.hops: list[Hop] = []
        self.stopped: str | None = None  # why the chain ended on a failure it could have moved past

    @property
    def reads_400(self) -> bool:
        return self.context is not None or (self.general is not None and CONTENT_POLICY in self.general.also_on)

    def remaining(self) -> float:
        return self.deadline_at - time.perf_counter()

    def next_model(self, reason: str | None) -> str | None:
        """The model to try after the current one failed with `reason`; None to hand the failure on."""
        rule = self._rule_for(reason)
        if rule is None:
            return None
        for model in rule.models:
            if model in self.tried:
                continue
            if self.remaining() <= 0:
                self.stopped = "deadline"
                return None
            self.tried.add(model)
            if self.allowed(model):
                return model
        return None

    def _rule_for(self, reason: str | None) -> FallbackRule | None:
        if reason is None:
            return None
        if reason == CONTEXT_WINDOW:
            return self.context
        general = self.general
        if general is not None and (reason in ALWAYS or reason in general.also_on):
            return general
        return None

    def hop(self, target: str, reason: str, status: int) -> None:
        self.hops.append(Hop(self.model, target, reason, status))
        metrics.FALLBACKS.labels(self.model, target, reason).inc()
        self.model = target


def send_along(chain: Chain, first: Any, send: Callable[[str], Any]) -> Any:
    """Follow the chain from the first model's failed `first` outcome; the answer (any status) that ends it.

    `send(model)` returns an UpstreamResult or raises a GatewayError. A hop's send is cut at the deadline
    (a timeout, which ends the chain there). The last failure is what the client gets when no model served.
    """
    outcome = first
    while True:
        reason = failure_reason(outcome, read_400=chain.reads_400)
        target = chain.next_model(reason)
        if target is None:
            if isinstance(outcome, GatewayError):
                raise outcome
            return outcome
        assert reason is not None
        if not isinstance(outcome, GatewayError):
            outcome.close()  # never passed on: its connection and in-flight count are freed now
        chain.hop(target, reason, outcome.status)
        outcome = _bounded_send(send, target, chain.remaining())
        if not isinstance(outcome, GatewayError) and outcome.status < 400:
            return outcome


def _bounded_send(send: Callable[[str], Any], model: str, seconds: float) -> Any:
    """One hop, cut when the chain's deadline passes (gevent's timer interrupts urllib3's waits and backoffs)."""
    timer = deadline(max(seconds, 0.001))
    timer.start()
    try:
        return send(model)
    except GatewayError as exc:
        return exc
    except BaseException as exc:
        if exc is not timer:
            raise
        return UpstreamTimeout("no model of the fallback chain answered before its deadline "
                               "(FALLBACK_DEADLINE_SECONDS)", code="fallback_deadline")
    finally:
        timer.cancel()

