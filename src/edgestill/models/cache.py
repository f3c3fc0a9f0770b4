"""One cached decoding step, across transformers versions."""

from __future__ import annotations


def decode_step(model, next_ids, out):
    """Run `model` on `next_ids` continuing from the KV cache held by the previous output `out`.

    transformers >= 5.2x returns and takes the cache as `cache`; earlier versions call it `past_key_values`
    (still accepted, with a deprecation warning, by later ones).
    """
    cache = out.get("cache") if hasattr(out, "get") else None
    if cache is not None:
        return model(input_ids=next_ids, cache=cache, use_cache=True)
    return model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
