"""`edgestill shrink student.trim_vocab=true` end to end on the tiny model: the student keeps only the training split's
tokens, is measured on the teacher's text through its own tokens, and its GGUF runs in llama.cpp with its tokenizer."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from conftest import WORDS, shrunk_run, tiny_overrides  # tests/ is on sys.path

from edgestill.cli import main

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def narrow_corpus(tmp_path_factory):
    """Text of 10 of the tiny tokenizer's words: the merges of the other words go unused, so the trim cuts them."""
    import random

    root = tmp_path_factory.mktemp("narrow")
    for i in range(8):
        rng = random.Random(i)
        (root / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(WORDS[:10]) for _ in range(rng.randint(4, 12)))
                                                    + "." for _ in range(200)))
    return root


@pytest.fixture(scope="module")
def trimmed_run(tiny_model_dir, narrow_corpus, tmp_path_factory):
    return shrunk_run(tmp_path_factory, "trim", tiny_model_dir, narrow_corpus, "student.trim_vocab=true", steps=4)


def test_the_trimmed_run_measures_the_student_on_the_teachers_tokens(trimmed_run):
    from transformers import AutoTokenizer

    m = json.loads((trimmed_run / "metrics.json").read_text())
    trim = m["vocab_trim"]
    tok = AutoTokenizer.from_pretrained(trimmed_run / "student")
    assert trim["student_vocab"] == len(tok) < trim["teacher_vocab"]
    assert trim["student_tokens_per_teacher_token"] >= 1.0 and 0.0 <= trim["teacher_trimmed_mass"] < 1.0
    assert trim["out_of_domain"]["student_tokens_per_teacher_token"] >= trim["student_tokens_per_teacher_token"]
    for key in ("retention", "top1_agreement", "kl_teacher_student"):
        assert math.isfinite(m[key]) and math.isfinite(m["out_of_domain"][key]), key
    assert m["zero_shot"]["student"]["accuracy"] is not None
    assert m["student"]["params"] < m["teacher"]["params"]
    generations = json.loads((trimmed_run / "generations.json").read_text())
    assert all(isinstance(g["student"], str) for g in generations)


def test_a_trimmed_run_refuses_a_ready_made_student(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    rc = main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "run"), "student.trim_vocab=true",
               f"student.model={tiny_model_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "student.trim_vocab" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def _runs_in_llamacpp_as_transformers_does(run, tmp_path) -> None:
    """The run's student exported to an f32 GGUF: llama.cpp tokenizes as its tokenizer does and gives its logits."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgestill.evaluate.metrics import logit_parity
    from edgestill.runtime.llamacpp import LlamaCpp, llamacpp_logits

    gguf = tmp_path / "student.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(gguf), "--type", "f32"]) == 0
    tok = AutoTokenizer.from_pretrained(run / "student")
    model = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()
    text = "the king spoke of quantum zebras"
    with LlamaCpp(gguf, n_ctx=64) as m:
        assert m.llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text)["input_ids"]
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    parity = logit_parity(ref, np.asarray(llamacpp_logits(gguf, ids, kv_type="f32")))
    assert parity["top1_agreement"] >= 0.99 and parity["max_abs_diff"] < 1e-4 * parity["logit_scale"]


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_the_trimmed_students_gguf_runs_in_llamacpp_with_its_tokenizer(trimmed_run, tmp_path):
    _runs_in_llamacpp_as_transformers_does(trimmed_run, tmp_path)


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_a_trimmed_student_with_cut_hidden_channels_runs_in_llamacpp(tiny_model_dir, narrow_corpus, tmp_path_factory,
                                                                       tmp_path):
    """Two levers a plan can pull together (--hidden-sizes with student.trim_vocab): fewer embedding rows, and
    narrower ones."""
    import json

    run = shrunk_run(tmp_path_factory, "trim-hidden", tiny_model_dir, narrow_corpus, "student.trim_vocab=true",
                     "student.hidden_size=32", steps=2)
    config = json.loads((run / "student" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["vocab_size"] < 300
    _runs_in_llamacpp_as_transformers_does(run, tmp_path)


def test_the_trim_keeps_every_token_of_the_whole_training_split_not_only_the_sample(tiny_model_dir, tmp_path):
    """Each document speaks its own four words; distilling on a 4-block sample misses some documents' words, and the
    trim still keeps them (the domain is the training split, the sample is only what the run distils on)."""
    import random

    import numpy as np
    from transformers import AutoTokenizer

    from edgestill.config import load_config
    from edgestill.data.corpus import corpus_blocks, tokenize_blocks

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        rng = random.Random(i)
        words = WORDS[4 * i: 4 * i + 4]
        (corpus / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(6)) + "."
                                                     for _ in range(100)))
    out = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_model_dir, corpus, out, steps=2), "student.trim_vocab=true",
                 "data.max_train_tokens=128"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGESTILL_CACHE", str(tmp_path / "edgestill-cache"))
        assert main(["shrink", *overrides]) == 0
    cfg = load_config(out / "config.yaml")
    teacher_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = corpus_blocks(cfg.data, teacher_tok)
    whole = set(np.unique(tokenize_blocks(data.splits.train, teacher_tok, cfg.data.seq_len)).tolist())
    sample = set(np.unique(data.train).tolist())
    assert sample < whole  # the sample really misses words of the split
    kept = set(AutoTokenizer.from_pretrained(out / "student").get_vocab())
    assert set(teacher_tok.convert_ids_to_tokens(sorted(whole))) <= kept
