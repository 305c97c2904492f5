"""A fixed sample of the labelled dev pairs (../shared/data, beside the repository), embedded once per session.

The pairs are read where they live and never copied into the project. Every SAMPLE_EVERY-th pair of each file is
used, held-out (odd) ids and fitted ones alike, so the sample keeps each file's mix of kinds.
"""

from __future__ import annotations

from functools import lru_cache

from tests.support import missing_tool
from tools.eval_semantic import SETS, Pair, embed_pairs, load_pairs

SAMPLE_EVERY = {"prompts": 4, "quora": 40}


@lru_cache(maxsize=1)
def sample() -> tuple[Pair, ...]:
    """About 180 prompt pairs and 190 Quora-style pairs, with their cosines filled in as the gateway computes them."""
    pairs: list[Pair] = []
    for name, path in SETS.items():
        if not path.exists():
            missing_tool(f"the dev pairs at {path} (shared/data beside the repository)")
        pairs += load_pairs(name, path)[:: SAMPLE_EVERY[name]]
    embed_pairs(pairs, cache=None, log=False)
    return tuple(pairs)
