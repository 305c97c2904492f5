"""The OpenAI-compatible routes: admit, look up the cache, forward, stream back, store, account.

The order is the architecture's request flow. Everything that outlives the view function (the stream, the
log line, releasing a rate-limit slot) runs from the response's close callback, without the request context.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from flask import Blueprint, Response, g, request
from werkzeug.datastructures import Headers

from app.api import EMBEDDINGS, FORWARDED, Endpoint, ParsedRequest
from app.auth import Tenant
from app.errors import Forbidden, GatewayError, NotFound, UpstreamBadResponse
from app.observability import tracing
from app.observability.record import RequestRecord
from app.proxy.body import read_body
from app.proxy.context import on_close, record, redis_budget, services
from app.proxy.sse import StreamTap, replay, replayable, sse_error
from app.proxy.validation import decode_body, parse_request
from app.ratelimit.admission import estimate_tokens, worst_case_usage
from app.spend.prices import Prices, token_count, usage_of
from app.upstream.client import UpstreamResult
from app.upstream.fallbacks import REFUSE_HEADER, Chain, send_along

if TYPE_CHECKING:
    from app.cache.service import CacheHit, CachePlan, CacheService
    from app.gateway import Gateway

log = logging.getLogger(__name__)

bp = Blueprint("proxy", __name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}



@bp.before_request
@tracing.traced(tracing.ADMIT)
def admit() -> None:
    """Authenticate and rate-limit before any body work (a refused request costs almost nothing).

    The body is read here only when the tenant has per-model limits, which need the model.
    """
    gw = services()
    rec = record()
    tenant = gw.auth.authenticate(request.headers.get("Authorization"), redis_budget())
    g.gw_tenant = tenant
    rec.tenant = tenant.name
    endpoint = FORWARDED_VIEWS.get(request.endpoint or "")
    if endpoint is None:
        return
    on_close(lambda: gw.spend.account(rec))  # first: the limiter's settlement below needs the request's cost
    admission = gw.limiter
    if admission is None:
        return
    model, max_tokens, worst_case = None, None, 0
    if admission.needs_model(tenant):
        parsed = _parsed(endpoint)
        model, max_tokens = parsed.model, parsed.body.get("max_tokens")
        if tenant.budget is not None:
            worst_case = _worst_case(tenant, parsed, gw.spend.prices)
    ticket = admission.admit(tenant, request_id=rec.request_id, model=model, budget=redis_budget(),
                             estimated_tokens=estimate_tokens(request.content_length or 0, max_tokens),
                             worst_case_nanos=worst_case)
    g.gw_limit_headers = ticket.headers
    on_close(lambda: admission.finish(ticket, _tokens_paid(rec), _cost_paid(rec)))


def _worst_case(tenant: Tenant, parsed: ParsedRequest, prices: Prices) -> int:
    """What a budgeted tenant's request may cost at most (nano-dollars); a model without a price cannot be capped,
    so it is refused."""
    tenant.check_model(parsed.model)
    price = prices.price(parsed.model)
    if price is None:
        raise Forbidden(f"The model `{parsed.model}` has no price in the gateway's PRICES_FILE, so the spend of the "
                        "key's tenant, which has a budget, could not be capped.", code="model_not_priced")
    return price.nanos(worst_case_usage(len(parsed.raw), parsed.body))


def _parsed(endpoint: Endpoint) -> ParsedRequest:
    """The request body, parsed and checked once (by the limiter's hook or the view, whichever is first)."""
    state = g._get_current_object()  # the request's `g`: one context look-up, not one per attribute
    parsed = state.get("gw_parsed")
    if parsed is None:
        gw = services()
        body = decode_body(read_body(gw.pending_bodies, state.gw_tenant.name),
                           request.headers.get("Content-Encoding"), gw.settings.max_body_bytes)
        parsed = state.gw_parsed = parse_request(endpoint.name, body)
    return parsed


def _tokens_paid(rec: RequestRecord) -> int | None:
    """What the request cost upstream, to settle its token reservation to; None keeps the estimate.

    A cached answer, a refused request and an upstream error cost no upstream tokens. An answer that ended
    without `usage` (the client left mid-stream, a provider that sends none) was still paid for upstream:
    keeping the estimate is nearer the truth than refunding it, which would let such requests run free.
    """
    if rec.cache in ("L0", "L1", "L2") or rec.upstream_ms is None or rec.status >= 400:
        return 0
    if rec.prompt_tokens is None and rec.completion_tokens is None:
        return None
    return (rec.prompt_tokens or 0) + (rec.completion_tokens or 0)


def _cost_paid(rec: RequestRecord) -> int | None:
    """What the request cost upstream in nano-dollars, to settle its budget reservation to (as `_tokens_paid`)."""
    if _tokens_paid(rec) is None:
        return None
    return rec.cost_nanos or 0


def _forward_view(endpoint: Endpoint) -> Callable[[], Response]:
    def view() -> Response:
        return _forward(endpoint)

    view.__name__ = endpoint.name
    return view


# Every endpoint with a body is forwarded the same way: one view each, named after it (`proxy.chat`, ...).
for _endpoint in FORWARDED.values():
    bp.add_url_rule(_endpoint.path, endpoint=_endpoint.name, view_func=_forward_view(_endpoint), methods=["POST"])
FORWARDED_VIEWS = {f"{bp.name}.{endpoint.name}": endpoint for endpoint in FORWARDED.values()}


@bp.get("/v1/models")
def models() -> Response:
    """The configured models when a backends file names them; otherwise the upstream's own list."""
    gw = services()
    configured = gw.upstream.pool.model_ids()
    if configured:
        body = {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "gateway"}
                                           for m in configured]}
        return Response(json.dumps(body), status=200, content_type="application/json")
    result = gw.upstream.get("/v1/models", record().request_id)
    _note_upstream(result)
    return Response(result.read(), status=result.status, content_type=result.content_type,
                    headers=_headers(result))


@bp.get("/v1/models/<path:model_id>")
def model(model_id: str) -> Response:
    """One model (the SDK's `models.retrieve`): from the configuration when it names models, else the upstream's."""
    gw = services()
    configured = gw.upstream.pool.model_ids()
    if configured:
        if model_id not in configured:
            raise NotFound(f"The model `{model_id}` does not exist or is not served here.", code="model_not_found")
        body = {"id": model_id, "object": "model", "created": 0, "owned_by": "gateway"}
        return Response(json.dumps(body), status=200, content_type="application/json")
    result = gw.upstream.get("/v1/models/" + quote(model_id, safe="/:@"), record().request_id)
    _note_upstream(result)
    return Response(result.read(), status=result.status, content_type=result.content_type,
                    headers=_headers(result))


def _forward(endpoint: Endpoint) -> Response:
    gw = services()
    rec = record()
    parsed = _parsed(endpoint)
    rec.model, rec.stream = parsed.model, parsed.stream
    g.gw_tenant.check_model(parsed.model)

    plan = None
    rec.cache = "BYPASS"  # reached the cache step: BYPASS unless the cache says otherwise
    if gw.cache is not None and endpoint.cacheable:
        plan = gw.cache.plan(parsed, g.gw_tenant.name, request.headers.get("Cache-Control"),
                             request.headers.get("X-Cache-TTL"), request.headers.get("X-Cache-Min-Similarity"),
                             redis_budget())
        with tracing.span(tracing.CACHE_LOOKUP) as span:
            hit = gw.cache.lookup(plan)
            span.cache_outcome(plan.outcome, plan.reason, hit)
        rec.cache = plan.outcome
        rec.semantic = plan.reason
        if hit is not None:
            return _from_cache(parsed, hit)

    body, raw = parsed.body, parsed.raw
    strip_usage = False
    if parsed.stream and not _client_wants_usage(body):
        # Ask for usage in the last chunk (token accounting) and hide that chunk from the client.
        body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        raw = json.dumps(body).encode()
        strip_usage = True

    result = _send(parsed, body, raw, rec)
    if rec.fallback_hops:
        plan = None  # another model's answer: never stored under the requested model's key
    _note_upstream(result)
    if parsed.stream and result.status == 200 and result.content_type.startswith("text/event-stream"):
        tap = StreamTap(endpoint.name, strip_usage=strip_usage, assemble=plan is not None)
        return Response(_relay(result, tap, plan, rec, gw.cache), status=200, mimetype="text/event-stream",
                        headers=_headers(result, SSE_HEADERS))
    if result.status == 200:
        return _answer(result, endpoint.name, plan, rec, gw.cache, gw.settings.cache_max_entry_bytes)
    return Response(result.read(), status=result.status, content_type=result.content_type,
                    headers=_headers(result))


def _send(parsed: ParsedRequest, body: dict[str, Any], raw: bytes, rec: RequestRecord) -> UpstreamResult:
    """The upstream's answer for the requested model or, when it cannot serve and a rule says so, for the next
    model of its fallback chain. Every failure is judged before any byte has reached the client."""
    gw = services()
    model = parsed.model
    try:
        result = gw.upstream.send(parsed.path, body, raw, model=model, stream=parsed.stream,
                                  request_id=rec.request_id)
    except GatewayError as exc:
        if not _may_fall_back(gw, parsed):
            raise
        result = _fall_back(parsed, body, rec, exc)
    else:
        if result.status >= 400 and _may_fall_back(gw, parsed):
            result = _fall_back(parsed, body, rec, result)
    rec.served_model = rec.served_model or model
    result.extra_headers["x-gateway-model"] = rec.served_model
    result.extra_headers["x-gateway-fallback-hops"] = str(rec.fallback_hops)
    return result


def _may_fall_back(gw: Gateway, parsed: ParsedRequest) -> bool:
    """Chains are for generating routes: an embedding from another model lives in another vector space."""
    return (gw.fallbacks is not None and parsed.route != EMBEDDINGS
            and request.headers.get(REFUSE_HEADER, "").strip().lower() != "none")


def _fall_back(parsed: ParsedRequest, body: dict[str, Any], rec: RequestRecord,
               first: UpstreamResult | GatewayError) -> UpstreamResult:
    """Follow the chain from the requested model's failure (`first`: its answer or its error)."""
    gw = services()
    tenant = g.gw_tenant
    chain = Chain(parsed.model, gw.fallbacks, tenant.fallbacks,
                  deadline_at=rec.started + gw.settings.fallback_deadline_seconds,
                  allowed=lambda model: _hop_admitted(model, parsed, rec))

    def send(model: str) -> UpstreamResult:
        hop_body = {**body, "model": model}
        return gw.upstream.send(parsed.path, hop_body, json.dumps(hop_body).encode(), model=model,
                                stream=parsed.stream, request_id=rec.request_id)

    try:
        result = send_along(chain, first, send)
    except GatewayError as exc:
        _note_chain(rec, chain, None)
        if chain.hops:
            exc.headers["x-gateway-fallback-hops"] = str(len(chain.hops))
        raise
    _note_chain(rec, chain, result)
    return result


def _note_chain(rec: RequestRecord, chain: Chain, result: UpstreamResult | None) -> None:
    rec.fallback_hops = len(chain.hops)
    if chain.hops:
        rec.fallbacks = [hop.as_log() for hop in chain.hops]
    if chain.stopped is not None:
        rec.fallbacks = [*(rec.fallbacks or ()), {"stopped": chain.stopped}]
    if result is not None:
        rec.served_model = chain.model


def _hop_admitted(model: str, parsed: ParsedRequest, rec: RequestRecord) -> bool:
    """The tenant may use `model`, and the model's own limits (where the tenant has some) admit one more request.

    The tenant's overall limits admitted this request already; only the model's scope is asked here, in one
    limiter call made only on a hop. Its reservation is settled at the end: to the usage if this model answered,
    to nothing if it failed too.
    """
    tenant = g.gw_tenant
    if tenant.models is not None and model not in tenant.models:
        return False
    if tenant.budget is not None and services().spend.prices.price(model) is None:
        return False  # its spend could not be capped (as a request for it would be refused: model_not_priced)
    admission, scoped = services().limiter, tenant.model_limits.get(model)
    if admission is None or scoped is None:
        return True
    try:
        ticket = admission.admit(Tenant(name=tenant.name, model_limits={model: scoped}), model=model,
                                 request_id=rec.request_id, budget=redis_budget(),
                                 estimated_tokens=estimate_tokens(len(parsed.raw), parsed.body.get("max_tokens")))
    except GatewayError as exc:  # limited (or the limiter failing closed): the chain passes this model over
        log.info("fallback to %s passed over: %s", model, exc.code, extra={"request_id": rec.request_id})
        return False
    on_close(lambda: admission.finish(ticket, _tokens_paid(rec) if rec.served_model == model else 0))
    return True


def _answer(result: UpstreamResult, route: str, plan: CachePlan | None, rec: RequestRecord,
            cache: CacheService | None, max_entry: int) -> Response:
    """A 200 JSON answer. When the upstream starts it with whitespace and the rest is still to come (DeepSeek
    sends blank lines while a request waits its turn, for minutes under load), it is passed through as it
    arrives, so a client behind an idle timeout sees those bytes as soon as they come; the copy to parse and
    cache is assembled on the side. Otherwise it is read whole first (the JSON itself comes quickly once it
    starts), so an answer over MAX_RESPONSE_BYTES or one that is not JSON is still a clean 502.

    An answer over CACHE_MAX_ENTRY_BYTES is neither kept nor parsed: its usage is read from its end.
    """
    if result.sized:
        try:
            content = result.read()  # one read of a declared length (most answers), bounded by MAX_RESPONSE_BYTES
        except BaseException:
            result.close()  # a killed greenlet too: the connection and the key's in-flight count are freed
            raise
    else:
        chunks = result.iter_raw()
        try:
            first = next((data for data in chunks if data), b"")
        except BaseException:
            result.close()
            raise
        if first and not first.strip() and result.response.length_remaining != 0:
            return Response(_pass_through(result, first, chunks, _Settle(route, plan, rec, cache, max_entry)),
                            status=200, content_type=result.content_type, headers=_headers(result))
        try:
            content = first + b"".join(chunks)  # bounded by MAX_RESPONSE_BYTES: over it, a 502 before any byte left
        finally:
            result.close()
    if len(content) > max_entry:
        # Too large to store: nothing needs it parsed, and parsing megabytes would stall this worker's other
        # requests. Passed on as it came, its usage read from the end.
        _note_usage(rec, _usage_at_end(content))
    else:
        _Settle(route, plan, rec, cache, max_entry).parsed(_json_answer(content), content)
    return Response(content, status=200, content_type=result.content_type, headers=_headers(result))


class _Settle:
    """What happens to a complete answer: its usage noted, and stored when it is small and replayable."""

    TAIL_BYTES = 8192  # what is kept of an answer too large to store: twice the window `_usage_at_end` reads

    def __init__(self, route: str, plan: CachePlan | None, rec: RequestRecord, cache: CacheService | None,
                 max_entry: int) -> None:
        self.route, self.plan, self.rec, self.cache, self.max_entry = route, plan, rec, cache, max_entry

    def parsed(self, answer: dict[str, Any], content: bytes) -> None:
        _note_usage(self.rec, answer.get("usage"))
        tracing.answered(answer)
        if self.plan is not None and self.cache is not None and replayable(answer, self.route):
            with tracing.span(tracing.CACHE_STORE):
                self.cache.store(self.plan, answer, content)


def _pass_through(result: UpstreamResult, first: bytes, chunks: Iterator[bytes], settle: _Settle) -> Iterator[bytes]:
    """The answer's bytes as they arrive; parsed and stored once complete. Runs outside the request context.

    Only up to CACHE_MAX_ENTRY_BYTES is kept for that (then only the tail, for the usage). A connection that
    breaks mid-body, or an answer that grows past MAX_RESPONSE_BYTES, is raised, so the client's connection is
    cut rather than ended cleanly on a truncated body that would pose as complete.
    """
    parts, size, tail = [first], len(first), b""
    try:
        yield first
        for data in chunks:
            size += len(data)
            if parts is not None and size <= settle.max_entry:
                parts.append(data)
            else:
                tail = (b"".join(parts or ()) + tail + data)[-settle.TAIL_BYTES:]
                parts = None
            yield data
    except GatewayError as exc:
        settle.rec.error = exc.message
        raise
    finally:
        result.close()
    if parts is None:
        _note_usage(settle.rec, _usage_at_end(tail))
        return
    content = b"".join(parts).strip()
    try:
        answer = _json_answer(content)
    except UpstreamBadResponse as exc:  # already passed on as it came: nothing to cache or count
        settle.rec.error = exc.message
        return
    settle.parsed(answer, content)


def _headers(result: UpstreamResult, own: dict[str, str] | None = None) -> Headers | dict[str, str]:
    """The upstream's passed-on headers, then the gateway's own, which replace any of the same name."""
    gateway = {**own, **result.extra_headers} if own else result.extra_headers
    passed = result.passed_headers()
    if not passed:  # most answers (DeepSeek sends none of them): nothing to merge
        return gateway
    headers = Headers(passed)
    for name, value in gateway.items():
        headers[name] = value
    return headers


def _client_wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _relay(result: UpstreamResult, tap: StreamTap, plan: CachePlan | None, rec: RequestRecord,
           cache: CacheService | None) -> Iterator[bytes]:
    """Pass events on as they arrive; a stream that breaks ends with an error event, never silently.

    Runs after the view returned, outside the request context: everything it needs is passed in.
    """
    stream = tracing.span(tracing.STREAM)
    try:
        # An empty first item makes gunicorn send the head now, as the upstream's arrived, not with the first
        # complete event (the worker does not hold an event stream's head back).
        yield b""
        for data in result.iter_raw():
            out = tap.feed(data)
            if out:
                yield out
        rest = tap.flush()
        if rest:
            yield rest
        if not tap.done:
            rec.error = "upstream stream ended before [DONE]"
            yield sse_error("The upstream closed the stream before it was complete.")
    except GatewayError as exc:
        rec.error = exc.message
        yield sse_error(exc.message, exc.error_type, exc.code)
    finally:
        result.close()
        _note_usage(rec, tap.usage)
        stream.stream_done(tap)
        answer = tap.answer()
        if answer is not None and plan is not None and cache is not None and replayable(answer, tap.route):
            with tracing.span(tracing.CACHE_STORE):
                cache.store(plan, answer, None)


def _from_cache(parsed: ParsedRequest, hit: CacheHit) -> Response:
    rec = record()
    rec.similarity = hit.similarity
    usage = hit.answer.get("usage") or {}
    rec.tokens_saved = int(usage.get("total_tokens") or 0)
    rec.saved_usage = usage_of(usage)  # priced when the request closes (app/spend/service.py)
    headers = {"X-Cache-Layer": hit.layer}
    if hit.similarity is not None:
        headers["X-Cache-Similarity"] = f"{hit.similarity:.4f}"
    if parsed.stream:
        events = replay(hit.answer, parsed.route, include_usage=_client_wants_usage(parsed.body))
        return Response(events, status=200, mimetype="text/event-stream", headers={**SSE_HEADERS, **headers})
    return Response(hit.content, status=200, content_type="application/json", headers=headers)


def _json_answer(content: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(content)
    except ValueError:
        raise UpstreamBadResponse("The upstream answered with something that is not JSON.") from None
    if not isinstance(answer, dict):
        raise UpstreamBadResponse("The upstream answered with JSON that is not an object.")
    return answer


USAGE_KEY = b'"usage"'
USAGE_MAX_BYTES = 4096


def _usage_at_end(content: bytes) -> Any:
    """The `usage` object of a JSON answer, without parsing the rest: OpenAI and DeepSeek write it last.

    `"usage"` with its quotes unescaped can only be a key or a whole string value, never text inside a string.
    """
    at = content.rfind(USAGE_KEY)
    if at < 0:
        return None
    rest = content[at + len(USAGE_KEY):at + len(USAGE_KEY) + USAGE_MAX_BYTES].lstrip()
    if not rest.startswith(b":"):
        return None
    try:
        usage, _ = json.JSONDecoder().raw_decode(rest[1:].lstrip().decode("utf-8", "replace"))
    except ValueError:
        return None
    return usage


def _note_upstream(result: UpstreamResult) -> None:
    rec = record()
    rec.upstream_key_id = result.key_id
    rec.retries = result.retries
    rec.upstream_ms = result.upstream_ms
    rec.backend = result.backend


def _note_usage(rec: RequestRecord, usage: Any) -> None:
    if isinstance(usage, dict):
        rec.prompt_tokens = token_count(usage.get("prompt_tokens"))
        rec.completion_tokens = token_count(usage.get("completion_tokens"))
        used = usage_of(usage)
        rec.cached_tokens = used.cached if used is not None else None
