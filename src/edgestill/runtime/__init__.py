"""Run what export writes: llama.cpp (llama-cpp-python) for GGUF files, onnxruntime for ONNX files.

    from edgestill.runtime.llamacpp import LlamaCpp, llamacpp_logits, llamacpp_quantize, llamacpp_speed
    from edgestill.runtime.onnx import onnx_session, onnx_logits, predict_onnx, measure_latency

Loading, scoring (logits), timing (prefill/decode tokens/s, per-example latency) and llama.cpp's own
quantizer live here; the writers stay in `edgestill.export`, the metrics computed from these numbers in
`edgestill.evaluate`. Both runtimes are imported only when called.
"""
