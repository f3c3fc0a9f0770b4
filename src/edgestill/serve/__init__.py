"""Serving a shrunk model: an OpenAI-compatible async HTTP server on llama.cpp with a deadline-aware scheduler.

engine.py    one GGUF in llama.cpp: completions, chat (the GGUF's template), measured service-time prediction
scheduler.py FIFO / EDF / value-density-first order, bounded queue, aging, early rejection of hopeless deadlines
cache.py     the exact response cache for deterministic requests
app.py       the FastAPI app: /v1/completions, /v1/chat/completions (SSE streaming), /v1/models, /health, /metrics
"""
