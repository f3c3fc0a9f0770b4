"""Zero-shot log-likelihood: exact values on a rigged model, batching, and parity with lm-evaluation-harness."""

from __future__ import annotations

import math
import types

import pytest
import torch

from conftest import load_tiny_teacher, one_line_error
from edgestill.evaluate.zeroshot import encode_pair, lambada, loglikelihood

HIGH = 5.0  # the rigged logit of the token a prefix is rigged to predict; every other logit is 0

REQUESTS = [
    ("the king speaks to the", " queen"),
    ("thou art fair and ", "noble"),  # the trailing space moves to the continuation
    ("good night, sweet lord", " and speak of love to thee"),
    ("death", " shall"),
    ("", "the crown"),  # empty context: BOS is the context, as in lm-eval
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_tiny_teacher(tiny_model_dir)


class RiggedLM(torch.nn.Module):
    """Logits HIGH on the token rigged to follow the prefix read so far, 0 elsewhere; uniform for unknown prefixes."""

    def __init__(self, vocab_size: int, sequences: list[list[int]]):
        super().__init__()
        self.vocab_size = vocab_size
        self.next_token = {tuple(seq[: t + 1]): seq[t + 1] for seq in sequences for t in range(len(seq) - 1)}
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # a parameter, so the model has a device

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)  # (B, T, V)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                token = self.next_token.get(tuple(row[: t + 1]))
                if token is not None:
                    logits[b, t, token] = HIGH
        return types.SimpleNamespace(logits=logits)


def _rigged_logprob(vocab_size: int) -> float:
    """log-softmax of the rigged token: one logit HIGH, vocab_size - 1 logits 0."""
    return HIGH - math.log(math.exp(HIGH) + vocab_size - 1)


def test_encode_pair_moves_trailing_space_and_cuts_one_encoding(tokenizer):
    context_ids, continuation_ids = encode_pair(tokenizer, "thou art fair and ", "noble")
    assert (context_ids, continuation_ids) == encode_pair(tokenizer, "thou art fair and", " noble")
    assert context_ids + continuation_ids == tokenizer("thou art fair and noble", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(continuation_ids) == " noble"
    assert encode_pair(tokenizer, "", "the crown") == ([tokenizer.bos_token_id], tokenizer("the crown", add_special_tokens=False)["input_ids"])


def test_rigged_continuation_is_greedy_with_exact_logprob(tokenizer):
    pairs = [encode_pair(tokenizer, c, x) for c, x in REQUESTS]
    rigged = RiggedLM(len(tokenizer), [ctx + cont for ctx, cont in pairs])
    results = loglikelihood(rigged, tokenizer, REQUESTS, batch_size=2)
    for (_, cont), (logprob, greedy) in zip(pairs, results):
        assert greedy is True
        assert logprob == pytest.approx(len(cont) * _rigged_logprob(len(tokenizer)), abs=1e-5)


def test_one_wrong_token_breaks_greedy_and_scores_that_token_uniformly(tokenizer):
    context_ids, cont = encode_pair(tokenizer, *REQUESTS[2])
    assert len(cont) >= 3
    # rigged on every prefix except the one before the continuation's last token: uniform there
    rigged = RiggedLM(len(tokenizer), [context_ids + cont[:-1]])
    (logprob, greedy), = loglikelihood(rigged, tokenizer, [REQUESTS[2]])
    assert greedy is False
    expected = (len(cont) - 1) * _rigged_logprob(len(tokenizer)) - math.log(len(tokenizer))
    assert logprob == pytest.approx(expected, abs=1e-5)


def test_truncation_keeps_the_last_max_length_tokens(tokenizer):
    context_ids, cont = encode_pair(tokenizer, *REQUESTS[2])
    max_length = len(cont) + 3
    assert len(context_ids + cont) > max_length + 1
    window = (context_ids + cont)[-(max_length + 1) : -1]  # what the model may read
    rigged = RiggedLM(len(tokenizer), [window + cont[-1:]])  # rigged only on the truncated prefixes
    (logprob, greedy), = loglikelihood(rigged, tokenizer, [REQUESTS[2]], max_length=max_length)
    assert greedy is True
    assert logprob == pytest.approx(len(cont) * _rigged_logprob(len(tokenizer)), abs=1e-5)
    msg = one_line_error(loglikelihood, rigged, tokenizer, [REQUESTS[2]], max_length=len(cont) - 1)
    assert "max_length" in msg


def test_batches_equal_one_request_at_a_time(model, tokenizer):
    one = loglikelihood(model, tokenizer, REQUESTS, batch_size=1)
    batched = loglikelihood(model, tokenizer, REQUESTS, batch_size=3)
    assert [g for _, g in one] == [g for _, g in batched]
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in one], abs=1e-4)
    assert len({round(lp, 3) for lp, _ in one}) == len(REQUESTS)  # distinct requests, results in request order


def test_lambada_accuracy_and_perplexity(tokenizer):
    passages = [("the king speaks to the", "queen"), ("thou art fair and", "noble"), ("good night sweet", "lord")]
    pairs = [encode_pair(tokenizer, c, " " + w) for c, w in passages]
    n_target_tokens = [len(cont) for _, cont in pairs]
    rigged = RiggedLM(len(tokenizer), [ctx + cont for ctx, cont in pairs[:2]] + [pairs[2][0]])  # the last one: uniform
    result = lambada(rigged, tokenizer, passages)
    per_token = _rigged_logprob(len(tokenizer))
    logprobs = [n_target_tokens[0] * per_token, n_target_tokens[1] * per_token,
                n_target_tokens[2] * -math.log(len(tokenizer))]
    assert result["task"] == "lambada_style_last_word" and result["n"] == 3
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["perplexity"] == pytest.approx(math.exp(-sum(logprobs) / 3), rel=1e-5)
    assert "lambada_passages" in one_line_error(lambada, rigged, tokenizer, [])


@pytest.mark.parametrize("max_length", [None, 24])  # 24: the longest request is truncated
def test_matches_lm_evaluation_harness(model, tiny_model_dir, max_length):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    # lm-eval sets a pad token on the tokenizer it is given: it gets its own copy
    theirs_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ours_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = HFLM(pretrained=model, tokenizer=theirs_tokenizer, batch_size=1, max_length=max_length)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(REQUESTS)]
    theirs = lm.loglikelihood(instances, disable_tqdm=True)
    ours = loglikelihood(model, ours_tokenizer, REQUESTS, batch_size=4, max_length=max_length)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-4)
