"""What makes two requests "the same": the canonical request, its SHA-256, and the L2 partition.

Fields that change the answer are in the key; fields that only change the delivery (`stream`,
`stream_options`) or bookkeeping (`user`, `metadata`) are not, so a streamed and a plain request share
one entry. JSON key order and whitespace never matter because the canonical form is re-serialised.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from app.api import CHAT, COMPLETIONS

# Fields that change neither the answer nor anything in it (`store: true` asks the provider to keep the
# completion, which only a request sent upstream does: CacheService.plan keeps such requests away from the cache).
# Not here, so in the key: `service_tier`, whose value the answer names (the tier that served it).
DELIVERY_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store"})


@dataclass(frozen=True)
class SemanticParts:
    """The text L2 embeds, and the hash of everything else that must match exactly."""

    partition: str
    text: str


def canonical(route: str, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
    answer_fields = {k: v for k, v in body.items() if k not in DELIVERY_FIELDS}
    return {"route": route, "tenant": tenant, "request": answer_fields}


def digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def exact_key(route: str, tenant: str, body: dict[str, Any]) -> str:
    """SHA-256 of the canonical request (hex)."""
    return digest(canonical(route, tenant, body))


def semantic_parts(route: str, tenant: str, body: dict[str, Any]) -> SemanticParts | None:
    """Split a chat/completions request into (partition, last user turn); None when L2 cannot apply.

    Everything except the last user turn's text — tenant, model, parameters, system prompt, every earlier
    turn — goes into the partition, so a follow-up in another conversation can never match.
    """
    if route == CHAT:
        messages = body.get("messages") or []
        last = messages[-1] if messages else None
        if not isinstance(last, dict) or last.get("role") != "user":
            return None
        text = message_text(last.get("content"))
        rest = {**body, "messages": [*messages[:-1], {k: v for k, v in last.items() if k != "content"}]}
    elif route == COMPLETIONS:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        text = prompt
        rest = {k: v for k, v in body.items() if k != "prompt"}
    else:
        return None
    if text is None or not text.strip():
        return None
    return SemanticParts(partition=digest(canonical(route, tenant, rest))[:32], text=text.strip())


def message_text(content: Any) -> str | None:
    """A message's text; None when it carries anything but text (an image is not a paraphrase)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                return None
            texts.append(part["text"])
        return "\n".join(texts)
    return None
