"""Export a student for deployment: the writers. GGUF files for llama.cpp, ONNX files for onnxruntime.

    from edgestill.export.gguf import export_gguf
    from edgestill.export.onnx import export_onnx
    from edgestill.export.onnx_classifier import export_classifier_onnx

Running what is written (llama.cpp, onnxruntime) is edgestill.runtime; checking a GGUF is
edgestill.models.load.check_gguf.
"""
