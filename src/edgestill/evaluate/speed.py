"""Prefill and decode tokens/s in transformers on this CPU, measured as the timing rules of
docs/references.md#measurement-conventions ask: warm up, repeat, alternate the models inside one run,
report medians and spreads.

Decode is greedy with the KV cache, one token per forward; its clock starts after the prefill.
"""

from __future__ import annotations

import statistics
import time

import torch

from edgestill.models.cache import decode_step


@torch.no_grad()
def _one_run(model, prompt: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    prefill_s = time.perf_counter() - t0
    next_id = out.logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        out = decode_step(model, next_id, out)
        next_id = out.logits[:, -1:].argmax(-1)
    decode_s = time.perf_counter() - t1
    return prompt.shape[1] / prefill_s, decode_tokens / decode_s


def measure_speed(models: dict[str, torch.nn.Module], prompt_ids: torch.Tensor | dict[str, torch.Tensor],
                  decode_tokens: int = 32, repeats: int = 3, threads: int = 2) -> dict[str, dict]:
    """{name: {prefill_tokens_per_s, decode_tokens_per_s, *_spread}} with models alternated each repeat.

    prompt_ids: one (1, T) prompt for all, or one per model name (models with different vocabularies read the same
    text as different ids)."""
    prompts = prompt_ids if isinstance(prompt_ids, dict) else {name: prompt_ids for name in models}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, m in models.items():
            m.eval()
            _one_run(m, prompts[name][:, :16], 4)  # warm-up: allocator, kernels, caches
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, m in models.items():
                runs[name].append(_one_run(m, prompts[name], decode_tokens))
    finally:
        torch.set_num_threads(previous)
    result = {}
    for name, values in runs.items():
        prefill = [v[0] for v in values]
        decode = [v[1] for v in values]
        result[name] = {
            "prefill_tokens_per_s": statistics.median(prefill),
            "prefill_tokens_per_s_spread": [min(prefill), max(prefill)],
            "decode_tokens_per_s": statistics.median(decode),
            "decode_tokens_per_s_spread": [min(decode), max(decode)],
            "threads": threads,
            "prompt_tokens": int(prompts[name].shape[1]),
            "decode_tokens": decode_tokens,
            "repeats": repeats,
        }
    return result


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (deterministic, so teacher and student compare fairly)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
