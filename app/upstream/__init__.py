"""Talking to the OpenAI-compatible upstream: HTTP session, backend/key pool, send and stream."""
