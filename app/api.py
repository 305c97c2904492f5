"""The API's vocabulary: which endpoints the gateway serves, what a parsed request is, what a clean finish is.

Standard library only, at the bottom of the import graph: the routes, validation, the SSE tap, the cache and the
metrics all read these definitions, so adding an endpoint or a finish reason is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI endpoint the gateway serves.

    ``name`` is the route's identity (it is part of every cache key: never rename one). ``label`` is its
    Prometheus `route` label. ``body_field`` names the field carrying the input (``messages``, ``prompt``,
    ``input``): an endpoint with one is a POST forwarded upstream, one without (the model list) is a GET the
    routes answer themselves. ``streams``: the client may ask for SSE (its answers carry `choices` with a
    `finish_reason`; the others answer a `data` list). ``cacheable``: its answers may be stored and replayed.
    ``genai_operation``: its `gen_ai.operation.name` in traces (OpenTelemetry GenAI conventions' values).
    """

    name: str
    path: str
    label: str
    body_field: str | None
    streams: bool
    cacheable: bool
    genai_operation: str | None = None


CHAT, COMPLETIONS, EMBEDDINGS, MODELS = "chat", "completions", "embeddings", "models"

ENDPOINTS = (
    Endpoint(CHAT, "/v1/chat/completions", "chat", "messages", streams=True, cacheable=True, genai_operation="chat"),
    Endpoint(COMPLETIONS, "/v1/completions", "completions", "prompt", streams=True, cacheable=True,
             genai_operation="text_completion"),
    Endpoint(EMBEDDINGS, "/v1/embeddings", "embeddings", "input", streams=False, cacheable=True,
             genai_operation="embeddings"),
    Endpoint(MODELS, "/v1/models", "models", None, streams=False, cacheable=False),
)
BY_NAME = {endpoint.name: endpoint for endpoint in ENDPOINTS}
BY_PATH = {endpoint.path: endpoint for endpoint in ENDPOINTS}
#: The endpoints whose body is forwarded upstream (POST), by name.
FORWARDED = {endpoint.name: endpoint for endpoint in ENDPOINTS if endpoint.body_field is not None}

#: Finish reasons of an answer that ended as the model meant it to: only such an answer is complete (cached,
#: replayed). `length`, `content_filter` and an answer cut short are not.
CLEAN_FINISH = frozenset({"stop", "tool_calls", "function_call"})


@dataclass(frozen=True)
class ParsedRequest:
    """A request body, parsed and checked once: the fields the gateway reads, and the bytes to forward as they came."""

    route: str  # an Endpoint's name
    path: str
    body: dict[str, Any]
    raw: bytes
    model: str
    stream: bool
