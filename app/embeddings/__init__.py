"""Embedding providers for the semantic (L2) cache: an in-process ONNX model or an OpenAI-compatible API."""

from app.embeddings.base import Embedder, EmbeddingError, build_embedder, l2_normalise

__all__ = ["Embedder", "EmbeddingError", "build_embedder", "l2_normalise"]
