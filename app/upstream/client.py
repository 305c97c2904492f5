"""Send a request upstream over the pool's keys and map every failure to a gateway error.

urllib3 retries one key (backoff, Retry-After); this module moves on to the next key or backend when a
key is limited, rejected or failing, always before the first byte of the answer reaches the client.

The requests `Session` and its `HTTPAdapter` own the connection pools and the `Retry` policy; the call itself goes
through `DirectPools` (connection.py, the one place that reaches under requests' public API).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import requests
from urllib3 import HTTPResponse
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.util import Timeout

from app.errors import (
    GatewayError,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    UpstreamBadResponse,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
    retry_after,
)
from app.observability import metrics, tracing
from app.upstream.backends import Backend, UpstreamKey
from app.upstream.connection import DirectPools, arrived
from app.upstream.health import DISABLED
from app.upstream.http import PEEKED_BODY, is_insufficient_quota, retry_after_seconds
from app.upstream.pool import UpstreamPool

log = logging.getLogger(__name__)

READ_SIZE = 65536
JOIN_MAX_BYTES = 64 * 1024  # a stream's chunks already here leave together up to this size (iter_raw)
LARGE_READ_SIZE = 1024 * 1024  # reads of an answer of unknown size, counted against MAX_RESPONSE_BYTES
PASSED_PREFIXES = ("x-ratelimit-", "openai-", "retry-after")
# Upstream statuses the openai SDKs would retry on their own; the gateway has already applied its budget to them.
CLIENT_RETRIED = frozenset({408, 409, 429}) | frozenset(range(500, 600))


@dataclass
class UpstreamResult:
    """An upstream answer whose headers arrived; the body is read (or streamed) by the caller."""

    status: int
    content_type: str
    response: HTTPResponse
    backend: str
    key_id: str
    retries: int
    upstream_ms: float
    extra_headers: dict[str, str] = field(default_factory=dict)
    final: bool = False  # no retry can help (out of credit): the client is told not to retry
    _release: Any = None
    max_bytes: int = 0  # MAX_RESPONSE_BYTES (0: no bound)
    scrub: Callable[[bytes], bytes] | None = None  # applied to error bodies passed on (upstream keys cut out)

    def passed_headers(self) -> dict[str, str]:
        """The upstream's own headers a client may read: rate limits (`x-ratelimit-*`), `openai-*` (processing
        time, organization, version, project) and `Retry-After`. The gateway's headers of the same name win."""
        return {name: value for name, value in self.response.headers.items()
                if name.lower().startswith(PASSED_PREFIXES) and _PRINTABLE_HEADER.fullmatch(value)}

    @property
    def sized(self) -> bool:
        """The upstream declared the answer's length (not chunked, no content coding): it had the whole answer when it
        sent the head, so the body follows at once (an answer still queueing upstream comes chunked)."""
        raw = self.response
        return not raw.chunked and _declared_length(raw) is not None and not raw.headers.get("content-encoding")

    def read(self) -> bytes:
        """The whole body, for non-streamed answers: at most `max_bytes` of it, or UpstreamResponseTooLarge."""
        try:
            data = self._read_bounded()
        except ReadTimeoutError as exc:
            self.close()
            raise UpstreamTimeout("the upstream stopped sending before the answer was complete") from exc
        except (HTTPError, OSError) as exc:
            self.close()
            raise UpstreamBadResponse("the upstream connection broke before the answer was complete") from exc
        self._finish(reuse=True)
        if self.status >= 400 and self.scrub is not None:
            data = self.scrub(data)
        return data

    def _read_bounded(self) -> bytes:
        raw = self.response
        peeked = getattr(raw, PEEKED_BODY, None)
        if peeked is not None:  # the retry policy read (the start of) this error body already
            return peeked + (raw.read(decode_content=True) or b"")
        limit = self.max_bytes
        length = _declared_length(raw)
        if not limit or (length is not None and length <= limit and not raw.chunked
                         and not raw.headers.get("content-encoding")):
            return raw.read(decode_content=True)  # one read of a known, allowed size (the common case)
        if length is not None and length > limit:
            raise self._too_large()  # refused before a byte of it is read
        parts, total = [], 0
        while True:
            data = raw.read(LARGE_READ_SIZE, decode_content=True)
            if not data:
                return b"".join(parts)
            total += len(data)
            if total > limit:
                raise self._too_large()
            parts.append(data)

    def _too_large(self) -> UpstreamResponseTooLarge:
        self.close()
        metrics.UPSTREAM_TOO_LARGE.labels(self.backend).inc()
        log.warning("upstream answer over MAX_RESPONSE_BYTES (%d) refused", self.max_bytes,
                    extra={"backend": self.backend, "upstream_key_id": self.key_id})
        return UpstreamResponseTooLarge(
            f"The upstream's answer is larger than the gateway passes on (MAX_RESPONSE_BYTES={self.max_bytes}).")

    def iter_raw(self) -> Iterator[bytes]:
        """Body bytes as they arrive, never the whole answer: each piece is everything that had arrived when it
        was read. HTTP chunks already here leave together (up to JOIN_MAX_BYTES), so a burst of events costs the
        client one write and one wake-up instead of one per event, and nothing ever waits for bytes to come.

        A connection that breaks or stalls mid-body raises a GatewayError, so the caller can end the stream
        with an error event (urllib3's own errors would escape the relay and cut the stream silently); what
        arrived before it is passed on first.
        """
        raw = self.response
        limit, total, passed = self.max_bytes, 0, 0
        if limit and (_declared_length(raw) or 0) > limit and not raw.headers.get("content-encoding"):
            raise self._too_large()  # refused before a byte of it is read (and before the client got a head)
        held: list[bytes] = []  # read while more had already arrived: passed on with it
        try:
            if raw.chunked and raw.supports_chunked_reads():
                chunks = raw.read_chunked(decode_content=True)
            else:
                chunks = iter(lambda: raw.read1(READ_SIZE), b"")
            for data in chunks:
                total += len(data)
                if limit and total > limit:
                    yield from _passed_on(held)
                    raise self._too_large()
                held.append(data)
                if total - passed < JOIN_MAX_BYTES and arrived(raw):
                    continue
                passed = total
                yield from _passed_on(held)
        except ReadTimeoutError as exc:
            yield from _passed_on(held)
            raise UpstreamTimeout("the upstream stopped sending before the answer was complete") from exc
        except (HTTPError, OSError) as exc:
            yield from _passed_on(held)
            raise UpstreamBadResponse("the upstream connection broke before the answer was complete") from exc
        yield from _passed_on(held)

    def close(self) -> None:
        """Done with the answer: a fully read connection goes back to the pool, anything else is closed
        (for a client that left mid-stream this is what stops the upstream generating)."""
        self._finish(reuse=self.response.isclosed() or _fully_read(self.response))

    def _finish(self, *, reuse: bool) -> None:
        if not reuse:
            self.response.close()
        self.response.release_conn()
        if self._release is not None:
            self._release()
            self._release = None


def _passed_on(held: list[bytes]) -> Iterator[bytes]:
    """The held pieces as one (and `held` emptied); nothing when there are none."""
    if held:
        piece = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        yield piece


def _declared_length(response: HTTPResponse) -> int | None:
    value = response.headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _fully_read(response: HTTPResponse) -> bool:
    return response.length_remaining == 0 if response.length_remaining is not None else False


class UpstreamClient:
    """The one way the gateway calls its upstreams."""

    def __init__(
        self,
        session: requests.Session,
        pool: UpstreamPool,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_response_bytes: int = 0,
        scrub: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.session = session
        self.pool = pool
        self._timeout = Timeout(connect=connect_timeout, read=read_timeout)
        self._pools = DirectPools(session)
        self._max_response_bytes = max_response_bytes
        self._scrub = scrub

    def send(self, path: str, body: dict[str, Any], raw_body: bytes, *, model: str | None, stream: bool,
             request_id: str) -> UpstreamResult:
        """POST to the best key; on a limited or failing key move to the next before anything is sent back."""
        return self._bounded(self._request("POST", path, model, request_id,
                                           lambda backend: _for_backend(backend, body, raw_body, model)))

    def get(self, path: str, request_id: str) -> UpstreamResult:
        """GET (the model list) over the same keys, with the same handling of limited and rejected keys."""
        return self._bounded(self._request("GET", path, None, request_id, lambda backend: None))

    def _bounded(self, result: UpstreamResult) -> UpstreamResult:
        """The answer as handed to the proxy: read at most MAX_RESPONSE_BYTES of it, error bodies scrubbed."""
        result.max_bytes = self._max_response_bytes
        result.scrub = self._scrub
        return result

    def _request(self, method: str, path: str, model: str | None, request_id: str,
                 payload: Callable[[Backend], bytes | None]) -> UpstreamResult:
        """Try the candidates in order within one budget of `UPSTREAM_MAX_RETRIES + 1` attempts in all.

        urllib3 retries one key; each key gets the budget left minus one attempt reserved for every key after
        it, so a failing key leaves room to try the others. Every attempt that failed (5xx, connection) or was
        retried is charged to the budget; moving past a key that refused (401/403, a 429 or no credit) is not,
        as another key may serve at once. So failures never cost more than the budget, and the client, told
        `x-should-retry: false`, does not multiply them with its own retries.
        """
        candidates, soonest = self.pool.candidates(model)
        if not candidates:
            raise self._no_candidate(model, soonest)
        adapter_retry = self._pools.retry(candidates[0][0].base_url)
        budget = max(1, (adapter_retry.total or 0) + 1)
        last_error: GatewayError | None = None
        attempts = spent = 0
        for index, (backend, key) in enumerate(candidates):
            left = budget - spent
            if left <= 0:
                break
            reserve = min(len(candidates) - index - 1, left - 1)
            retry = adapter_retry.new(total=left - 1 - reserve)
            is_last = index == len(candidates) - 1
            started = time.perf_counter()
            self.pool.acquire(key)
            tracing.upstream_attempt(method, path, backend, key.key_id, model)
            try:
                response = self._pools.urlopen(method, backend.base_url, path, body=payload(backend),
                                               headers=_headers(key, request_id), retries=retry,
                                               timeout=self._timeout)
            except (HTTPError, OSError) as exc:
                tracing.upstream_done(error=exc)
                self.pool.release(key)
                attempts += retry.total + 1  # urllib3 gave up: at most every attempt it had was used
                spent += retry.total + 1
                error = _map_send_error(exc)
                if isinstance(error, UpstreamTimeout) and not _is_connect_timeout(exc):
                    # It may be generating already: another key would pay twice.
                    raise _final(error, attempts) from exc
                self.pool.health.record_failure(key.key_id)  # once: urllib3 does not say how many attempts failed
                _count_retry("connection")
                last_error = error
                continue
            except BaseException as exc:
                tracing.upstream_done(error=exc)
                self.pool.release(key)  # a gevent Timeout or the worker stopping: no answer to account for
                raise
            tracing.upstream_done(status=response.status)
            result = UpstreamResult(
                status=response.status,
                content_type=_content_type(response.headers.get("content-type")),
                response=response, backend=backend.name, key_id=key.key_id, retries=attempts,
                upstream_ms=(time.perf_counter() - started) * 1000.0,
                _release=lambda key=key: self.pool.release(key),
            )
            accepted = False
            try:
                used = self._count_retries(response) + 1
                attempts += used
                spent += used if response.status >= 500 else used - 1
                result.retries = attempts - 1
                is_last = is_last or spent >= budget
                accepted = self._accept(result, key, model, is_last, listing=method == "GET", used=used)
                if accepted and result.status >= 400 and (
                        result.status in CLIENT_RETRIED or attempts > 1 or result.final):
                    # The gateway's retry budget already covered this failure (or nothing will help): a client's
                    # own retries (the openai SDKs retry 408, 409, 429 and 5xx twice) would multiply it.
                    result.extra_headers["x-should-retry"] = "false"
            finally:
                # Whatever is not handed to the caller (a refused key moved past, or the error raised for the
                # last one) frees its connection and its in-flight count here.
                if not accepted:
                    result.close()
            if accepted:
                return result
        if last_error is None:  # every candidate was tried; the loop returns on the last one otherwise
            last_error = UpstreamUnreachable("no upstream answered")
        raise _final(last_error, attempts)

    def _count_retries(self, response: HTTPResponse) -> int:
        reasons = retry_reasons(response)
        for reason in reasons:
            _count_retry(reason)
        return len(reasons)

    def _accept(self, result: UpstreamResult, key: UpstreamKey, model: str | None, is_last: bool, *,
                listing: bool = False, used: int = 1) -> bool:
        """Update the key's health; True when this answer goes to the client, False to try the next key.

        A 403 to the model list (`listing`) does not take the key out: a key restricted to inference (OpenAI's
        restricted keys can be) may be refused the list and still serve every chat request. Running out of
        credit (DeepSeek's 402, a 429 `insufficient_quota`) is final for this key, not a rate limit: the key is
        tried after others from now on, the request moves to another key if there is one, and nothing rests.
        """
        status = result.status
        health = self.pool.health
        if status == 402 or (status == 429 and is_insufficient_quota(result.response)):
            health.deplete(key.key_id)
            log.warning("upstream key %s is out of credit (%s)", key.key_id, status,
                        extra={"upstream_key_id": key.key_id, "upstream_status": status})
            result.final = True
            return is_last
        if status == 429:
            until = health.cool_down(key.key_id, retry_after_seconds(result.response.headers.get("Retry-After")),
                                     model=model)
            log.warning("upstream key %s rate limited for %s, cooling down", key.key_id, model,
                        extra={"upstream_key_id": key.key_id, "cooldown_s": round(until - time.time(), 1)})
            _count_retry("429")
            if is_last:
                result.extra_headers["Retry-After"] = retry_after(until - time.time())
            return is_last
        if status == 403 and listing:
            log.warning("upstream key %s may not list models (403)", key.key_id,
                        extra={"upstream_key_id": key.key_id, "upstream_status": status})
            if is_last:
                raise UpstreamBadResponse("the upstream refused to list its models (403)", code="upstream_forbidden")
            return False
        if status in (401, 403):
            health.disable(key.key_id)
            log.error("upstream key %s rejected with %s: taken out of rotation until restored",
                      key.key_id, status, extra={"upstream_key_id": key.key_id, "upstream_status": status})
            if is_last:
                raise UpstreamBadResponse(
                    f"the upstream rejected the gateway's credentials ({status})", code="upstream_auth_failed"
                )
            return False
        if status >= 500:
            for _ in range(used):  # every attempt urllib3 made on this key failed the same way
                health.record_failure(key.key_id, model or "")
            _count_retry("5xx")
            return is_last
        health.record_success(key.key_id, model or "")
        return True

    def _no_candidate(self, model: str | None, soonest: float) -> GatewayError:
        # Asked first: DISABLED is also infinite, so `soonest` alone cannot tell "no backend" from "keys disabled".
        if not self.pool.knows_model(model):
            return NotFound(f"The model `{model}` does not exist or is not served here.", code="model_not_found")
        if soonest == DISABLED:
            return ServiceUnavailable("every upstream key for this model is disabled; an operator must restore one")
        return RateLimited("every upstream key is cooling down; retry later", code="upstream_rate_limited",
                           headers={"Retry-After": retry_after(soonest - time.time())})


_PRINTABLE_HEADER = re.compile(r"[\x20-\x7e]{1,200}")


def _content_type(value: str | None) -> str:
    """The upstream's Content-Type, passed on only when it is a value gunicorn will write (printable ASCII)."""
    if value is not None and _PRINTABLE_HEADER.fullmatch(value):
        return value
    return "application/json"


def _headers(key: UpstreamKey, request_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
    if key.secret:
        headers["Authorization"] = f"Bearer {key.secret}"
    return headers


def _for_backend(backend: Backend, body: dict[str, Any], raw_body: bytes, model: str | None) -> bytes:
    """The client's bytes untouched, unless the backend calls the model by another name."""
    if model is None or model not in backend.model_map:
        return raw_body
    return json.dumps({**body, "model": backend.upstream_model(model)}).encode()


def _count_retry(reason: str) -> None:
    metrics.UPSTREAM_RETRIES.labels(reason).inc()


def _final(error: GatewayError, attempts: int) -> GatewayError:
    """The gateway's own error after trying the upstream within its retry budget: a client retrying on top would
    multiply the attempts (and, after a read timeout, possibly pay twice for one answer)."""
    if attempts >= 1:
        error.headers["x-should-retry"] = "false"
    return error


def retry_reasons(response: HTTPResponse) -> list[str]:
    """Why urllib3 repeated the request, one bounded label per retry: `429`, `5xx` or `connection`."""
    retries = getattr(response, "retries", None)
    reasons = []
    for attempt in retries.history if retries is not None else ():
        if attempt.status == 429:
            reasons.append("429")
        elif attempt.status is not None and attempt.status >= 500:
            reasons.append("5xx")
        else:
            reasons.append("connection")
    return reasons


def _map_send_error(exc: BaseException) -> GatewayError:
    """urllib3's errors -> 504 for timeouts, 502 for everything else that prevented an answer."""
    reason = exc.reason if isinstance(exc, MaxRetryError) else exc
    if isinstance(reason, NewConnectionError):  # a subclass of ConnectTimeoutError, for old callers' sake
        return UpstreamUnreachable("the upstream could not be reached")
    if isinstance(reason, (ReadTimeoutError, ConnectTimeoutError, TimeoutError)):
        return UpstreamTimeout("the upstream did not answer in time")
    return UpstreamUnreachable("the upstream could not be reached")


def _is_connect_timeout(exc: BaseException) -> bool:
    reason = exc.reason if isinstance(exc, MaxRetryError) else exc
    return isinstance(reason, ConnectTimeoutError)  # NewConnectionError included: nothing reached the upstream
