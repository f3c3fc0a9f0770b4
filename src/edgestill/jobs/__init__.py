"""The jobs: one module per command, each a short recipe over the library packages.

    shrink.py    edgestill shrink | distill | eval        the LM student: slice, distil (+QAT), evaluate
    quantize.py  edgestill quantize                       post-training quantization of the teacher (RTN, GPTQ)
    export.py    edgestill export                         a finished run as GGUF (llama.cpp) or ONNX (onnxruntime)
    plan.py      edgestill devices | plan | shrink --device   device profiles, plans within a budget, and running one
    sweep.py     edgestill sweep                          one plan per size budget, each shrunk: the shrink curve
    classify.py  edgestill finetune | shrink --task classification   the encoder classifier track

A job may import any library package (config, data, models, distill, quant, plan, runtime, evaluate, export);
no package imports a job (tests/test_architecture.py checks it). `cli.py` parses arguments, calls one job
function and prints what it returns.
"""
