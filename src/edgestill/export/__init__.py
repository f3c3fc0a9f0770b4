"""Export a student for deployment: GGUF files for llama.cpp, and llama.cpp itself as the reference runtime.

    from edgestill.export.gguf import export_gguf, check_gguf
    from edgestill.export.llamacpp import llamacpp_logits, llamacpp_quantize
"""
