"""Zero-shot task accuracy by log-likelihood, computed as lm-evaluation-harness computes it.

A request is a (context, continuation) pair; its result is (sum of the continuation's token log-probs,
is_greedy: every continuation token is the model's argmax), as `HFLM.loglikelihood` returns
(EleutherAI/lm-evaluation-harness, lm_eval/api/model.py `_encode_pair`, lm_eval/models/huggingface.py
`_loglikelihood_tokens`). Reconstructed here, not imported, so evaluation needs no lm-eval install;
tests/evaluate/test_zeroshot.py checks the numbers against lm-eval itself when it is installed.

- lambada: last-word prediction (lm-eval's lambada_openai): accuracy = mean is_greedy,
  perplexity = exp(-mean log-likelihood of the target word)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgestill.errors import EdgestillError
from edgestill.progress import progress_bar

DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for a model whose config names no context length


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), no special tokens, cut from one encoding of the whole text.

    Trailing spaces of the context move to the continuation, and the continuation is what the whole text
    has after the context's tokens, so " word" is tokenized as the model saw it in running text.
    An empty context becomes the BOS token (EOS when there is none), as in lm-eval.
    """
    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if continuation_ids[:1] == [prefix]:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def _max_length(model) -> int:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None) or DEFAULT_MAX_LENGTH


@torch.no_grad()
def loglikelihood(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                  max_length: int | None = None) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) for each (context, continuation), in request order.

    The model reads (context + continuation) ids, left-truncated to max_length + 1 and without the last
    token (which nothing after it predicts); `max_length` defaults to the model's context length.
    Requests run longest first in right-padded batches: a causal model's real positions never attend to
    the padding after them, so a batch gives what one request alone gives.
    """
    model.eval()
    max_length = max_length or _max_length(model)
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    for (context, continuation), (_, continuation_ids) in zip(requests, pairs):
        if not 0 < len(continuation_ids) <= max_length:
            raise EdgestillError(f"continuation {continuation!r} (after context ...{context[-30:]!r}) is "
                                 f"{len(continuation_ids)} tokens; give a non-empty continuation of at most max_length={max_length} tokens")
    windows = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(windows[i]))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    bar = progress_bar(total=len(pairs), desc="log-likelihood", unit="req")
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids = torch.full((len(batch), len(windows[batch[0]])), pad, dtype=torch.long)  # (B, T), longest first
        for row, i in enumerate(batch):
            ids[row, : len(windows[i])] = torch.tensor(windows[i])
        logits = model(input_ids=ids.to(device)).logits  # (B, T, V)
        for row, i in enumerate(batch):
            target = torch.tensor(pairs[i][1], device=logits.device)  # (C,)
            end = len(windows[i])  # position end-1 predicts the last continuation token
            logp = F.log_softmax(logits[row, end - len(target) : end].float(), dim=-1)  # (C, V)
            results[i] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
        bar.update(len(batch))
    bar.close()
    return results


def lambada(model, tokenizer, passages: list[tuple[str, str]], batch_size: int = 8) -> dict:
    """Last-word prediction on (context, target_word) passages: lm-eval lambada_openai's acc and ppl."""
    if not passages:
        raise EdgestillError("no LAMBADA passages to score; build them with data.general.lambada_passages(n) and n >= 1")
    results = loglikelihood(model, tokenizer, [(context, " " + word) for context, word in passages], batch_size)
    logprobs = [logprob for logprob, _ in results]
    return {
        "task": "lambada_style_last_word",
        "n": len(results),
        "accuracy": sum(greedy for _, greedy in results) / len(results),
        "perplexity": math.exp(-sum(logprobs) / len(logprobs)),
    }
