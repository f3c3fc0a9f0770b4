"""Vocabulary trimming: the domain's tokenization is unchanged, any text still encodes, the embedding keeps its rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_text  # tests/ is on sys.path

from edgestill.errors import EdgestillError
from edgestill.models.vocab import (
    byte_alphabet,
    plan_trim,
    trim_embeddings_,
    trim_tokenizer,
    used_token_counts,
)

DOMAIN = [make_text(s, 60) for s in range(6)]
OTHER = ["Quantum chromodynamics: gluons bind quarks; résumé naïve café 🙂 1234567890 {json: [1, 2]}",
         "The capital of France is Paris. Zebras and xylophones quietly juxtapose."]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (about 500 tokens: the generator's words, merged whole), trained on more text than the domain."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(s, 80) for s in range(60)] + OTHER * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def trimmed(tokenizer):
    counts = used_token_counts(np.concatenate([tokenizer(t)["input_ids"] for t in DOMAIN]), len(tokenizer))
    trim = plan_trim(tokenizer, counts)
    return trim, trim_tokenizer(tokenizer, trim)


def test_the_byte_alphabet_is_gpt2s():
    from tokenizers import pre_tokenizers

    assert sorted(byte_alphabet()) == sorted(pre_tokenizers.ByteLevel.alphabet()) and len(set(byte_alphabet())) == 256


def test_the_trimmed_vocabulary_is_smaller_and_keeps_bytes_and_specials(tokenizer, trimmed):
    trim, small = trimmed
    assert 256 + 3 <= trim.size < len(tokenizer) and len(small) == trim.size
    vocab = small.get_vocab()
    assert all(c in vocab for c in byte_alphabet())
    assert (small.bos_token, small.eos_token, small.unk_token) == ("<s>", "</s>", "<unk>")
    assert small.convert_ids_to_tokens(small.bos_token_id) == "<s>"
    assert list(trim.kept) == sorted(trim.kept)  # old ids keep their order


def test_the_domain_tokenizes_exactly_as_before(tokenizer, trimmed):
    trim, small = trimmed
    table = trim.new_ids()
    for text in DOMAIN + [make_text(99, 30)]:  # the training text, and unseen text from the same generator
        old = tokenizer(text)["input_ids"]
        if (table[old] < 0).any():
            continue  # a token the domain did not use: this text is not all in-domain
        assert small(text)["input_ids"] == table[old].tolist()
    old = tokenizer(DOMAIN[0])["input_ids"]
    assert (table[old] >= 0).all()


def test_any_text_still_encodes_and_decodes_back(tokenizer, trimmed):
    trim, small = trimmed
    for text in OTHER:
        ids = small(text)["input_ids"]
        assert small.decode(ids) == text == tokenizer.decode(tokenizer(text)["input_ids"])
        assert len(ids) >= len(tokenizer(text)["input_ids"])  # fewer merges: as long or longer
    assert len(small(OTHER[0])["input_ids"]) > len(tokenizer(OTHER[0])["input_ids"])


def test_min_count_keeps_fewer_tokens(tokenizer):
    counts = used_token_counts(np.concatenate([tokenizer(t)["input_ids"] for t in DOMAIN]), len(tokenizer))
    common = int(np.median(counts[counts > 0])) + 1
    assert plan_trim(tokenizer, counts, min_count=common).size < plan_trim(tokenizer, counts).size


def test_the_trimmed_model_gives_the_kept_logits(tokenizer, trimmed):
    from transformers import LlamaConfig, LlamaForCausalLM

    trim, small = trimmed
    torch.manual_seed(0)
    for tied in (True, False):
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.tensor([tokenizer(DOMAIN[1])["input_ids"][:40]])
        with torch.no_grad():
            full = model(ids).logits
            trim_embeddings_(model, trim)
            cut = model(torch.tensor([small(DOMAIN[1])["input_ids"][:40]])).logits
        torch.testing.assert_close(cut, full[..., list(trim.kept)], atol=0, rtol=0)
        assert model.config.vocab_size == trim.size and model.config.bos_token_id == small.bos_token_id
        assert model.get_input_embeddings().weight.shape[0] == trim.size
        assert (model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied


def test_a_non_bpe_tokenizer_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(EdgestillError, match="needs a BPE tokenizer"):
        plan_trim(PreTrainedTokenizerFast(tokenizer_object=tok), np.ones(2, dtype=np.int64))
