"""Fallback rules: parsing, which failures move along a chain, and the order and deadline of the hops."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from urllib3 import HTTPResponse

from app.errors import BadRequest, NotFound, RateLimited, ServiceUnavailable, UpstreamTimeout, UpstreamUnreachable
from app.upstream.client import UpstreamResult
from app.upstream.fallbacks import (
    CONTEXT_WINDOW,
    COOLING_DOWN,
    INSUFFICIENT_QUOTA,
    RATE_LIMITED,
    SERVER_ERROR,
    Chain,
    FallbackConfigError,
    FallbackRule,
    FallbackRules,
    failure_reason,
    load_fallback_rules,
    parse_rules,
    send_along,
)


def result(status: int, body: Any = None, *, final: bool = False) -> UpstreamResult:
    raw = json.dumps(body if body is not None else {}).encode()
    response = HTTPResponse(body=io.BytesIO(raw), status=status, headers={"Content-Length": str(len(raw))},
                            preload_content=False)
    return UpstreamResult(status=status, content_type="application/json", response=response, backend="b",
                          key_id="k", retries=0, upstream_ms=1.0, final=final)


def error_body(code: str) -> dict[str, Any]:
    return {"error": {"message": "m", "type": "invalid_request_error", "code": code}}


def chain(rules: FallbackRules, requested: str = "a", *, tenant: dict[str, FallbackRule] | None = None,
          seconds: float = 60.0, allowed: Any = None) -> Chain:
    return Chain(requested, rules, tenant or {}, deadline_at=time.perf_counter() + seconds,
                 allowed=allowed or (lambda model: True))


RULES = FallbackRules(
    fallbacks={"a": FallbackRule(("b", "c"))},
    context_window={"a": FallbackRule(("a-long",))},
)


def test_rules_parse_the_map_and_litellms_list_form(tmp_path: Path) -> None:
    """`{a: [b]}` and LiteLLM's `[{a: [b]}]` mean the same; `also_on` names insufficient_quota."""
    path = tmp_path / "upstreams.yaml"
    path.write_text(
        "backends: [{url: 'http://x'}]\n"
        "fallbacks:\n  - deepseek-chat: [gpt-4o-mini, llama]\n"
        "  - gpt-4o: {models: [gpt-4o-mini], also_on: [insufficient_quota]}\n"
        "context_window_fallbacks:\n  gpt-4o-mini: [gpt-4o]\n"
    )
    rules = load_fallback_rules(path, 30.0)
    assert rules.fallbacks == {"deepseek-chat": FallbackRule(("gpt-4o-mini", "llama")),
                               "gpt-4o": FallbackRule(("gpt-4o-mini",), frozenset({"insufficient_quota"}))}
    assert rules.context_window == {"gpt-4o-mini": FallbackRule(("gpt-4o",))}
    assert rules.deadline_seconds == 30.0 and rules.models() == {"deepseek-chat", "gpt-4o-mini", "llama", "gpt-4o"}
    assert not load_fallback_rules(None, 60.0)


@pytest.mark.parametrize("value, message", [
    ("a", "expected a map"),
    ({"a": "b"}, "expected a list of models"),
    ({"a": ["a", "b"]}, "appears twice"),
    ({"a": ["b", "b"]}, "appears twice"),
    ({"a": {"models": ["b"], "also_on": ["bad_request"]}}, "also_on"),
    ({"a": {"models": ["b"], "when": ["x"]}}, "unknown field"),
    ({"a": [""]}, "expected a list of models"),
])
def test_bad_rules_are_refused_at_start_saying_where(value: Any, message: str) -> None:
    """Each malformed rule names its place in the file."""
    with pytest.raises(FallbackConfigError, match=message) as info:
        parse_rules(value, "UPSTREAMS_FILE f: fallbacks")
    assert "UPSTREAMS_FILE f: fallbacks" in str(info.value)


def test_context_window_rules_cannot_widen_their_reason() -> None:
    """`also_on` belongs to `fallbacks`; a context-window rule is a plain list."""
    with pytest.raises(FallbackConfigError):
        parse_rules({"a": {"models": ["b"], "also_on": ["insufficient_quota"]}}, "w", also_on=False)


@pytest.mark.parametrize("outcome, reason", [
    (lambda: result(503), SERVER_ERROR),
    (lambda: result(500), SERVER_ERROR),
    (lambda: result(429), RATE_LIMITED),
    (lambda: result(429, final=True), INSUFFICIENT_QUOTA),
    (lambda: result(402), INSUFFICIENT_QUOTA),
    (lambda: UpstreamTimeout("t"), "timeout"),
    (lambda: UpstreamUnreachable("u"), "unreachable"),
    (lambda: RateLimited("r", code="upstream_rate_limited"), COOLING_DOWN),
    (lambda: ServiceUnavailable("every key disabled"), "unavailable"),
    (lambda: result(400, error_body("context_length_exceeded")), CONTEXT_WINDOW),
    (lambda: result(400, error_body("content_policy_violation")), "content_policy"),
    (lambda: result(400, error_body("invalid_request_error")), None),
    (lambda: result(404), None),
    (lambda: result(422), None),
    (lambda: result(200), None),
    (lambda: NotFound("no such model"), None),
    (lambda: RateLimited("the tenant's own limit"), None),
    (lambda: BadRequest("b"), None),
])
def test_failure_reasons(outcome: Any, reason: str | None) -> None:
    """Provider trouble is a reason to move on; the client's own errors are not."""
    assert failure_reason(outcome(), read_400=True) == reason


def test_a_400_body_read_for_its_code_is_still_passed_on() -> None:
    """Peeking at a 400's code keeps the body for the client when no hop is taken."""
    answer = result(400, error_body("context_length_exceeded"))
    assert failure_reason(answer, read_400=True) == CONTEXT_WINDOW
    assert json.loads(answer.read())["error"]["code"] == "context_length_exceeded"


def test_a_400_is_not_read_without_a_rule_that_could_use_it() -> None:
    """No context-window rule: a 400 is the client's own, its body untouched."""
    assert failure_reason(result(400, error_body("context_length_exceeded")), read_400=False) is None


def test_chain_moves_in_order_and_only_for_fixable_reasons() -> None:
    """5xx -> b -> c -> end; a plain 400 moves nowhere; a context 400 goes to the longer model only."""
    c = chain(RULES)
    assert c.next_model(SERVER_ERROR) == "b"
    assert c.next_model("unreachable") == "c"
    assert c.next_model(SERVER_ERROR) is None
    assert chain(RULES).next_model(None) is None
    assert chain(RULES).next_model(CONTEXT_WINDOW) == "a-long"
    assert chain(RULES, "b").next_model(CONTEXT_WINDOW) is None  # no rule for b
    assert chain(RULES).next_model(INSUFFICIENT_QUOTA) is None  # not named by the rule


def test_insufficient_quota_moves_only_where_the_rule_names_it() -> None:
    """`also_on: [insufficient_quota]` is the only way out of credit moves to another model."""
    rules = FallbackRules(fallbacks={"a": FallbackRule(("b",), frozenset({INSUFFICIENT_QUOTA}))})
    assert chain(rules).next_model(INSUFFICIENT_QUOTA) == "b"


def test_a_tenants_rule_replaces_the_global_one_for_its_model() -> None:
    """The tenant's own chain for `a` is followed; an empty one turns fallbacks off for it."""
    assert chain(RULES, tenant={"a": FallbackRule(("c",))}).next_model(SERVER_ERROR) == "c"
    assert chain(RULES, tenant={"z": FallbackRule(("c",))}).next_model(SERVER_ERROR) == "b"
    assert chain(RULES, tenant={"a": FallbackRule(())}).next_model(SERVER_ERROR) is None


def test_models_not_allowed_are_passed_over() -> None:
    """A model the tenant may not use (or whose own limits refuse) is skipped, not an error."""
    assert chain(RULES, allowed=lambda m: m != "b").next_model(SERVER_ERROR) == "c"


def test_no_hop_starts_after_the_deadline() -> None:
    """Past the chain's deadline the failure is handed on, and the log says why."""
    c = chain(RULES, seconds=-1.0)
    assert c.next_model(SERVER_ERROR) is None
    assert c.stopped == "deadline"


def test_send_along_returns_the_first_answer_and_closes_the_failures() -> None:
    """a 503, b unreachable, c answers: c's answer with two hops recorded; a's response was closed."""
    first = result(503)
    sent: list[str] = []

    def send(model: str) -> UpstreamResult:
        sent.append(model)
        if model == "b":
            raise UpstreamUnreachable("down")
        return result(200, {"model": model})

    c = chain(RULES)
    answer = send_along(c, first, send)
    assert answer.status == 200 and sent == ["b", "c"] and c.model == "c"
    assert [h.as_log() for h in c.hops] == [
        {"from": "a", "to": "b", "reason": SERVER_ERROR, "status": 503},
        {"from": "b", "to": "c", "reason": "unreachable", "status": 502},
    ]
    assert first.response.isclosed() or first.response.closed


def test_send_along_hands_on_the_last_failure() -> None:
    """Every model failing: the client gets the last one's error."""
    with pytest.raises(UpstreamUnreachable):
        send_along(chain(FallbackRules(fallbacks={"a": FallbackRule(("b",))})), result(503),
                   lambda model: (_ for _ in ()).throw(UpstreamUnreachable("down")))


def test_a_hop_still_waiting_at_the_deadline_is_cut() -> None:
    """A hop that has not answered when the chain's deadline passes ends as a 504 `fallback_deadline`."""
    import gevent

    def slow(model: str) -> UpstreamResult:
        gevent.sleep(5)
        return result(200)

    started = time.perf_counter()
    with pytest.raises(UpstreamTimeout) as info:
        send_along(chain(FallbackRules(fallbacks={"a": FallbackRule(("b",))}), seconds=0.2), result(503), slow)
    assert info.value.code == "fallback_deadline" and time.perf_counter() - started < 1.0
