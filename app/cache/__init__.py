"""The hybrid cache: L0 in-process LRU, L1 Redis exact, L2 semantic (embeddings + verification)."""
