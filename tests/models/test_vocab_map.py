"""A student with a trimmed vocabulary, trained and compared on the teacher's tokens (models/vocab.VocabMap): keeping
every token changes no number, a trimmed token is spelled by kept pieces and scored by the chain rule, and the
distillation target in the student's vocabulary stays a distribution whatever the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_text  # tests/ is on sys.path

from edgestill.config import DistillConfig
from edgestill.distill.losses import LOGIT_LOSS_KINDS, LogitLossConfig, logit_loss
from edgestill.distill.trainer import LiveTeacher, Methods, train_step
from edgestill.evaluate.metrics import compare_lm, token_nll, trimmed_student_view
from edgestill.models.vocab import VocabMap, plan_trim, trim_embeddings_, trim_student_vocab, trim_tokenizer


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _blocks(tokenizer, text: str, n: int = 4, width: int = 24) -> np.ndarray:
    ids = tokenizer(text)["input_ids"]
    return np.asarray(ids[: n * width], dtype=np.int64).reshape(n, width)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_keeping_every_token_changes_no_number(teacher):
    model, tok = teacher
    student = _copy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a student that differs from the teacher
    vocab = VocabMap(range(model.config.vocab_size), model.config.vocab_size)
    blocks = _blocks(tok, make_text(3, 80))
    plain, mapped = compare_lm(model, student, blocks, 2)["summary"], compare_lm(model, student, blocks, 2, vocab)["summary"]
    for key in ("teacher_perplexity", "student_perplexity", "retention", "top1_agreement", "kl_teacher_student"):
        assert mapped[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key
    assert mapped["vocab_trim"]["teacher_trimmed_mass"] == pytest.approx(0.0, abs=1e-6)
    assert mapped["vocab_trim"]["student_tokens_per_teacher_token"] == 1.0
    np.testing.assert_allclose(token_nll(student, blocks, 2, vocab=vocab), token_nll(student, blocks, 2), rtol=1e-5)


@pytest.fixture(scope="module")
def trimmed(teacher):
    """The tiny teacher's student with the tokens of one short text only (most merges trimmed)."""
    model, tok = teacher
    train = _blocks(tok, make_text(0, 12), n=1, width=20)
    student, small, vocab = trim_student_vocab(_copy(model), tok, train, model.config.vocab_size)
    return student, small, vocab, train


def test_a_trimmed_token_is_spelled_by_kept_pieces(teacher, trimmed):
    model, tok = teacher
    student, small, vocab, _ = trimmed
    assert vocab.size < model.config.vocab_size and student.config.vocab_size == vocab.size
    seq = tok(make_text(5, 40))["input_ids"][:60]
    assert any(vocab.table[i] < 0 for i in seq), "the test text must hold trimmed tokens"
    pieces, starts = vocab.expand(seq)
    assert len(pieces) > len(seq) and starts[0] == 0 and np.all(np.diff(starts) >= 1)
    assert small.decode(pieces) == tok.decode(seq)  # the same text
    for i, old in enumerate(seq):  # each teacher token is the run of pieces that starts at its own start
        end = starts[i + 1] if i + 1 < len(seq) else len(pieces)
        assert small.decode(pieces[starts[i]:end]) == tok.decode([old])


def test_the_trimmed_nll_of_a_teacher_token_is_the_chain_rule_over_its_pieces(teacher, trimmed):
    model, tok = teacher
    student, small, vocab, _ = trimmed
    block = _blocks(tok, make_text(5, 40), n=1, width=30)
    nll, at, n = trimmed_student_view(student, block, vocab)
    pieces, starts = vocab.expand(block[0])
    assert n == len(pieces) and nll.shape == (1, 29) and at.shape == (1, 29, vocab.size)
    with torch.no_grad():
        logp = torch.log_softmax(student(input_ids=torch.tensor([pieces])).logits[0].float(), -1)
    for i in range(1, 30):
        end = starts[i + 1] if i + 1 < 30 else len(pieces)
        manual = -sum(float(logp[p - 1, pieces[p]]) for p in range(starts[i], end))
        assert nll[0, i - 1] == pytest.approx(manual, rel=1e-5)
        torch.testing.assert_close(at[0, i - 1], logp[starts[i] - 1])
    summary = compare_lm(model, student, block, 1, vocab)["summary"]
    assert summary["eval_tokens"] == 29 and summary["student_perplexity"] == pytest.approx(float(np.exp(nll.mean())))
    assert 0 < summary["vocab_trim"]["teacher_trimmed_mass"] < 1 and summary["kl_teacher_student"] >= 0


def test_the_target_in_the_students_vocabulary_is_a_distribution_and_every_loss_is_finite(trimmed):
    student, small, vocab, _ = trimmed
    old = vocab.old_size
    torch.manual_seed(0)
    teacher_lp = torch.log_softmax(torch.randn(2, 5, old), -1)
    lp, ids = torch.topk(teacher_lp, 8, dim=-1)
    ids[..., 0] = int(np.flatnonzero(vocab.table.numpy() < 0)[0])  # a trimmed id among the top-k
    new_lp, new_ids = vocab.teacher_topk(lp, ids)
    assert torch.all(new_ids[..., 0] == vocab.dummy) and torch.all(new_lp[..., 0] == float("-inf"))
    trimmed_ids = vocab.table[ids] < 0
    assert torch.equal(new_ids == vocab.dummy, trimmed_ids) and torch.all(new_lp[trimmed_ids] == float("-inf"))
    assert torch.all((new_ids >= 0) & (new_ids <= vocab.size)) and torch.all(new_lp[~trimmed_ids] > lp[~trimmed_ids])
    assert torch.all(new_lp.exp().sum(-1) <= 1 + 1e-5)  # the kept top-k, renormalised; the rest is the tail
    logits = torch.randn(2, 5, vocab.size, requires_grad=True)
    for kind in LOGIT_LOSS_KINDS:
        for temperature in (1.0, 2.0):
            loss = logit_loss(VocabMap.with_dummy_column(logits), LogitLossConfig(kind=kind, temperature=temperature),
                              topk_logprobs=new_lp, topk_ids=new_ids)
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (kind, temperature)


def test_a_training_step_with_every_token_kept_is_the_plain_step(teacher):
    model, tok = teacher
    blocks = _blocks(tok, make_text(2, 80), n=4, width=16)
    vocab = VocabMap(range(model.config.vocab_size), model.config.vocab_size)
    cfg = DistillConfig(top_k=8, batch_size=2)
    results = []
    for v in (None, vocab):
        student = _copy(model)
        methods = Methods.from_config(cfg, student)
        methods.vocab = v
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        results.append(train_step(student, opt, LiveTeacher(model, 8), blocks, np.array([0, 1]), cfg,
                                  list(student.parameters()), methods))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_trimmed_student_trains_and_refuses_text_outside_its_training_tokens(teacher, trimmed):
    model, tok = teacher
    train = trimmed[3]
    student, _, vocab = trim_student_vocab(_copy(model), tok, train, model.config.vocab_size)
    cfg = DistillConfig(top_k=8, batch_size=1)
    methods = Methods.from_config(cfg, student)
    methods.vocab = vocab
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    loss, kd, ce, _ = train_step(student, opt, LiveTeacher(model, 8), train, np.array([0]), cfg,
                                 list(student.parameters()), methods)
    assert torch.isfinite(loss) and kd >= 0 and ce > 0
    other = _blocks(tok, make_text(5, 40), n=1, width=20)
    with pytest.raises(Exception, match="trimmed from the student's vocabulary"):
        train_step(student, opt, LiveTeacher(model, 8), other, np.array([0]), cfg, list(student.parameters()), methods)


def test_the_map_of_a_saved_student_comes_back_from_its_config(teacher, trimmed, tmp_path):
    from edgestill.models.load import load_causal_lm, save_causal_lm

    model, tok = teacher
    student, small, vocab, _ = trimmed
    save_causal_lm(student, small, tmp_path / "student", "float32")
    loaded = load_causal_lm(str(tmp_path / "student"))
    again = VocabMap.of_model(loaded.model, tok, loaded.tokenizer, model.config.vocab_size)
    assert again is not None and torch.equal(again.kept, vocab.kept) and again.size == len(loaded.tokenizer)
    assert VocabMap.of_model(model, tok, tok) is None


def test_trim_helpers_agree(teacher):
    """trim_student_vocab is plan_trim + trim_tokenizer + trim_embeddings_ on the split's token counts."""
    model, tok = teacher
    train = _blocks(tok, make_text(1, 12), n=1, width=20)
    _, small, vocab = trim_student_vocab(_copy(model), tok, train)
    counts = np.bincount(train.ravel(), minlength=len(tok))
    trim = plan_trim(tok, counts)
    assert list(vocab.kept.tolist()) == list(trim.kept)
    assert trim_tokenizer(tok, trim).get_vocab() == small.get_vocab()
    assert trim_embeddings_(_copy(model), trim).config.vocab_size == vocab.size


def test_a_chat_answer_is_scored_the_same_through_a_map_that_keeps_everything_and_by_pieces_when_trimmed(teacher, trimmed):
    from edgestill.evaluate.chat import _answer_scores, _answer_scores_trimmed

    model, tok = teacher
    prompt = torch.tensor([tok(make_text(4, 2))["input_ids"][:10]])
    answer = tok(make_text(5, 3))["input_ids"][:12]
    everything = VocabMap(range(model.config.vocab_size), model.config.vocab_size)
    plain, mapped = _answer_scores(model, prompt, answer, model.config.vocab_size), _answer_scores_trimmed(
        model, prompt, answer, everything)
    assert mapped == pytest.approx(plain, rel=1e-5)
    student, small, vocab, _ = trimmed
    assert any(vocab.table[i] < 0 for i in answer)
    s_prompt = torch.tensor([vocab.expand(prompt[0].tolist())[0]])
    nll, top1 = _answer_scores_trimmed(student, s_prompt, answer, vocab)
    pieces, _ = vocab.expand(answer)
    with torch.no_grad():
        logp = torch.log_softmax(student(torch.tensor([s_prompt[0].tolist() + pieces])).logits[0].float(), -1)
    start = s_prompt.shape[1]
    chain = -sum(float(logp[start + p - 1, pieces[p]]) for p in range(len(pieces)))
    assert nll == pytest.approx(chain / len(answer), rel=1e-5)
    assert top1 <= sum(vocab.table[i] >= 0 for i in answer) / len(answer)  # a token it lacks is never its top-1
