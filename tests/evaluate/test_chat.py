"""Chat-prompt comparison of a student against an instruct teacher, on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from edgestill.evaluate.chat import (
    CHAT_PROMPTS,
    chat_answers,
    chat_compare,
    chat_markdown,
    has_chat_template,
    stop_token_ids,
)
from edgestill.models.slice import slice_decoder
from tests.conftest import load_tiny_teacher

# A minimal template in the ChatML shape, with the tiny tokenizer's </s> as end-of-turn.
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture
def chat_tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def chatty_model(model_dir, seed: int = 0):
    """The tiny model's shape with larger random weights (std 0.2).

    At the usual std 0.02 the residual stream is the input embedding, and with tied embeddings every such
    model just repeats the last token: two different random models would give the same answers.
    """
    config = AutoConfig.from_pretrained(model_dir)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def test_student_equal_to_reference_agrees_on_every_token(tiny_model_dir, chat_tokenizer):
    model = chatty_model(tiny_model_dir)
    result = chat_compare(model, model, chat_tokenizer, max_new_tokens=8)
    assert [r["prompt"] for r in result["prompts"]] == list(CHAT_PROMPTS)
    for row in result["prompts"]:
        assert row["student_answer"] == row["reference_answer"]
        assert row["answer_top1"] == 1.0
        assert row["student_answer_nll"] == pytest.approx(row["reference_answer_nll"], abs=1e-6)
        assert 1 <= row["answer_tokens"] <= 8
    s = result["summary"]
    assert s["answer_top1"] == 1.0 and s["n_prompts"] == len(CHAT_PROMPTS) and s["max_new_tokens"] == 8
    assert s["answer_tokens"] == sum(r["answer_tokens"] for r in result["prompts"])


@pytest.mark.parametrize("kind", ["other_weights", "sliced"])
def test_a_different_student_agrees_less_and_finds_the_answers_less_likely(kind, tiny_model_dir, chat_tokenizer):
    reference = chatty_model(tiny_model_dir, seed=0)
    student = chatty_model(tiny_model_dir, seed=1) if kind == "other_weights" else slice_decoder(reference, [0, 3])
    s = chat_compare(reference, student, chat_tokenizer, max_new_tokens=8)["summary"]
    assert s["answer_top1"] < 0.5
    assert s["student_answer_nll"] > s["reference_answer_nll"] + 1.0
    assert all(math.isfinite(s[k]) for k in ("student_answer_nll", "reference_answer_nll"))


def test_answers_generated_once_serve_every_student_with_the_same_result(tiny_model_dir, chat_tokenizer):
    reference = chatty_model(tiny_model_dir, seed=0)
    answers = chat_answers(reference, chat_tokenizer, max_new_tokens=8)
    assert answers["prompts"] == list(CHAT_PROMPTS) and answers["max_new_tokens"] == 8
    assert all(isinstance(t, int) for answer in answers["answers"] for t in answer)  # plain data: it can be cached
    for seed in (1, 2):
        student = chatty_model(tiny_model_dir, seed=seed)
        fresh = chat_compare(reference, student, chat_tokenizer, max_new_tokens=8)
        assert chat_compare(None, student, chat_tokenizer, answers=answers) == fresh  # the reference is not run


def test_answers_stop_at_the_end_of_turn_token(tiny_model_dir, chat_tokenizer):
    reference = chatty_model(tiny_model_dir)
    eos = chat_tokenizer.eos_token_id
    assert stop_token_ids(chat_tokenizer) == [eos]
    bias = torch.zeros(reference.config.vocab_size)
    bias[eos] = 100.0  # the reference now ends its turn at once
    reference.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    result = chat_compare(reference, chatty_model(tiny_model_dir), chat_tokenizer, max_new_tokens=8)
    for row in result["prompts"]:
        assert row["answer_tokens"] == 1 and row["reference_answer"] == ""  # eos scored, not shown
    assert result["summary"]["reference_answer_nll"] < 1e-3 < result["summary"]["student_answer_nll"]


def test_a_tokenizer_without_chat_template_gives_none(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_tiny_teacher(tiny_model_dir)
    assert not has_chat_template(tokenizer)
    assert chat_compare(model, model, tokenizer) is None


def test_markdown_escapes_pipes_and_line_breaks():
    row = {"prompt": "a | b?", "reference_answer": "x|y\nz", "student_answer": "plain", "student_answer_nll": 1.23456,
           "reference_answer_nll": 0.5, "answer_top1": 0.25, "answer_tokens": 4}
    summary = {"student_answer_nll": 1.23456, "reference_answer_nll": 0.5, "answer_top1": 0.25, "answer_tokens": 4,
               "n_prompts": 1, "max_new_tokens": 48}
    text = chat_markdown({"prompts": [row], "summary": summary})
    table_row = text.splitlines()[2]
    assert table_row == "| a \\| b? | x\\|y<br>z | plain | 1.235 |"
    assert table_row.replace("\\|", "").count("|") == 5  # still four cells
    assert "0.500" in text and "25.0%" in text
