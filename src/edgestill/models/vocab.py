"""Vocabulary trimming for a byte-level BPE decoder: keep the tokens a domain uses, and a tokenizer that still
encodes any text.

The tied embedding of SmolLM2-135M is 49,152 x 576: 21% of its parameters, and most of the model for teachers with
150k-260k-token vocabularies. A domain uses far fewer tokens. `plan_trim` keeps
    the tokens seen in the domain's training text (at least `min_count` times),
    the byte tokens of byte-level BPE (so any text the full tokenizer encodes still encodes: an unseen word falls
        apart into kept pieces; SmolLM2 has 235 of the 256, lacking bytes that UTF-8 text never holds),
    the added / special tokens (the chat template's, end of text),
    and, recursively, both parts of every merge that produces a kept token;
and the merges whose two parts and result are all kept, in their original order (rank).

Why the tokenization of the domain does not change (tests/models/test_vocab.py checks it on text): BPE encodes a
word by applying, again and again, the lowest-ranked merge whose two parts stand next to each other. Every merge the
full tokenizer applies to a word whose tokens are all kept builds a piece of some kept token, so by the closure it is
kept, with its rank; the trimmed tokenizer only lacks merges the full one did not apply. At each step it therefore
finds the same lowest-ranked merge, and ends with the same tokens. Text with unseen tokens encodes into more, shorter
tokens. Decoding any encoding gives the text back.

`trim_tokenizer` writes that tokenizer (its tokenizer.json and tokenizer_config.json with the ids renumbered: new id
= position in `kept`, so old ids keep their order); `trim_embeddings_` gathers the embedding rows (and an untied
head's) in place and renumbers the config's special token ids. A trimmed student predicts kept tokens only: on text
outside the domain it pays for that in longer encodings, which `what broke` measures.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgestill.errors import EdgestillError


def byte_alphabet() -> list[str]:
    """The 256 symbols byte-level BPE writes bytes as (GPT-2's bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@dataclass(frozen=True)
class VocabTrim:
    """Which tokens stay: `kept[new_id] = old_id` (ascending), and the merges that stay, in rank order."""

    kept: tuple[int, ...]
    merges: tuple
    old_size: int

    @property
    def size(self) -> int:
        return len(self.kept)

    def new_ids(self) -> np.ndarray:
        """old id -> new id (-1: trimmed)."""
        table = np.full(self.old_size, -1, dtype=np.int64)
        table[np.asarray(self.kept)] = np.arange(len(self.kept))
        return table

    def to_dict(self) -> dict:
        return {"old_size": self.old_size, "size": self.size, "kept": list(self.kept)}


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EdgestillError(f"{type(tokenizer).__name__} has no fast (tokenizer.json) backend; vocabulary trimming "
                             "needs a byte-level BPE tokenizer.json")
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise EdgestillError(f"vocabulary trimming needs a BPE tokenizer; this one is {model.get('type')} (leave "
                             "student.trim_vocab off for it)")
    present = sum(c in model["vocab"] for c in byte_alphabet())
    if present < 200 or model.get("byte_fallback"):  # SmolLM2's lacks 21, bytes UTF-8 text never holds
        raise EdgestillError(f"vocabulary trimming needs a byte-level BPE tokenizer (its vocabulary holds {present} of "
                             "the 256 byte symbols), so that text outside the kept tokens still encodes")
    return tj


def _merge_parts(merge) -> tuple[str, str]:
    if isinstance(merge, str):
        a, b = merge.split(" ", 1)
        return a, b
    return merge[0], merge[1]


def used_token_counts(blocks: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in `blocks` (any shape of ids)."""
    return np.bincount(np.asarray(blocks, dtype=np.int64).ravel(), minlength=vocab_size)[:vocab_size]


def plan_trim(tokenizer, counts: np.ndarray, min_count: int = 1) -> VocabTrim:
    """The tokens and merges to keep (module docstring) from per-token `counts` over the domain's training text."""
    tj = _tokenizer_json(tokenizer)
    vocab: dict[str, int] = tj["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    old_size = max([*vocab.values(), *added.values()]) + 1
    if len(counts) < old_size:
        counts = np.pad(counts, (0, old_size - len(counts)))
    token_of = {i: t for t, i in vocab.items()}
    producers: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for m in tj["model"]["merges"]:
        a, b = _merge_parts(m)
        producers[a + b].append((a, b))

    keep = {token_of[i] for i in np.flatnonzero(counts[:old_size] >= min_count) if i in token_of}
    keep |= {c for c in byte_alphabet() if c in vocab}  # the byte symbols the tokenizer has
    stack = list(keep)
    while stack:  # the closure: both parts of every merge that produces a kept token
        for a, b in producers.get(stack.pop(), ()):
            for part in (a, b):
                if part not in keep:
                    keep.add(part)
                    stack.append(part)
    kept_ids = sorted({vocab[t] for t in keep} | set(added.values()))
    merges = tuple(m for m in tj["model"]["merges"] if all(p in keep for p in (*_merge_parts(m), "".join(_merge_parts(m)))))
    return VocabTrim(tuple(int(i) for i in kept_ids), merges, old_size)


def _renumber_post_processor(node, new_id):
    """Special-token ids inside a post-processor (TemplateProcessing, Sequence of them, Roberta/Bert pairs)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "ids" and isinstance(v, list) and all(isinstance(x, int) for x in v):
                out[k] = [new_id(x) for x in v]
            elif k in ("sep", "cls") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                out[k] = [v[0], new_id(v[1])]
            else:
                out[k] = _renumber_post_processor(v, new_id)
        return out
    if isinstance(node, list):
        return [_renumber_post_processor(x, new_id) for x in node]
    return node


def renumber_special_ids(spec: dict, new_id) -> None:
    """In a tokenizer.json dict, in place: the ids of the added tokens, of the post-processor's special tokens and of
    the padding token become `new_id(old id)` (every vocabulary trimmer's bookkeeping: this one, and the WordPiece
    one of models/encoder.py)."""
    for t in spec.get("added_tokens", []):
        t["id"] = new_id(t["id"])
    spec["post_processor"] = _renumber_post_processor(spec.get("post_processor"), new_id)
    if spec.get("padding") and spec["padding"].get("pad_id") is not None:
        spec["padding"]["pad_id"] = new_id(spec["padding"]["pad_id"])


def trim_tokenizer(tokenizer, trim: VocabTrim):
    """The tokenizer of a trimmed student: the same pre-tokenizer, normalizer, decoder, special tokens and chat
    template, with `trim`'s vocabulary and merges, ids renumbered."""
    from transformers import AutoTokenizer

    table = trim.new_ids()

    def new_id(old: int) -> int:
        if table[old] < 0:
            raise EdgestillError(f"token id {old} is referenced by the tokenizer's configuration but was trimmed")
        return int(table[old])

    tj = _tokenizer_json(tokenizer)
    tj["model"]["vocab"] = {t: new_id(i) for t, i in tj["model"]["vocab"].items() if table[i] >= 0}
    tj["model"]["merges"] = list(trim.merges)
    renumber_special_ids(tj, new_id)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
        config_path = Path(tmp) / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            if "added_tokens_decoder" in config:
                config["added_tokens_decoder"] = {str(new_id(int(k))): v for k, v in config["added_tokens_decoder"].items()}
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=1))
        for name in ("vocab.json", "merges.txt"):  # slow-tokenizer files would describe the old vocabulary
            (Path(tmp) / name).unlink(missing_ok=True)
        return AutoTokenizer.from_pretrained(tmp)


@torch.no_grad()
def trim_embeddings_(model, trim: VocabTrim):
    """Keep the embedding rows (and an untied head's rows) of the kept tokens, in place; renumber the config's
    special token ids. Returns the model."""
    table = trim.new_ids()
    index = torch.tensor(trim.kept, dtype=torch.long)
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < trim.old_size:
        raise EdgestillError(f"the model's embedding has {emb.weight.shape[0]} rows, fewer than the tokenizer's "
                             f"{trim.old_size} ids: the tokenizer is not this model's")
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    new_emb = torch.nn.Embedding(trim.size, emb.weight.shape[1], dtype=emb.weight.dtype)
    new_emb.weight.copy_(emb.weight[index])
    model.set_input_embeddings(new_emb)
    if head is not None:
        if tied:
            head.weight = new_emb.weight
        else:
            new_head = torch.nn.Linear(head.in_features, trim.size, bias=head.bias is not None, dtype=head.weight.dtype)
            new_head.weight.copy_(head.weight[index])
            if head.bias is not None:
                new_head.bias.copy_(head.bias[index])
            model.set_output_embeddings(new_head)
    model.config.vocab_size = trim.size
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                setattr(config, key, int(table[value]) if 0 <= value < trim.old_size and table[value] >= 0 else None)
            elif isinstance(value, list):
                setattr(config, key, [int(table[v]) for v in value if 0 <= v < trim.old_size and table[v] >= 0])
    # what the GGUF export needs to cut the teacher GGUF's tokenizer fields the same way (export/gguf.py)
    model.config.edgestill_vocab_trim = {"old_size": trim.old_size, "size": trim.size, "kept": list(trim.kept)}
    return model


class VocabMap:
    """How a trimmed student reads the teacher's token ids, so that the two can be trained and compared on the same text.

    kept[new id] = old id. A kept token is one student token; a trimmed token is spelled by the student's tokenizer as
    a few kept pieces (its BPE on that token's string, `pieces`), so any sequence of teacher ids becomes a sequence of
    student ids holding the same bytes, and every teacher token boundary is a student token boundary.

    What this gives the rest of edgestill:
      student_ids(ids)     the student's ids of a batch whose tokens are all kept (the training split, by construction)
      expand(seq)          any teacher sequence as student ids, with where each teacher token's pieces start
      teacher_topk(lp, ids) a teacher top-k target in the student's vocabulary: trimmed ids point at one extra
                           column (`dummy` = size) that the student gives no mass, and the kept ids are renormalised
                           (the teacher conditioned on the tokens the student has: the closest it can be)
      kept_logprobs(lp)    the same for dense teacher log-probs (V) -> (K), renormalised
    """

    def __init__(self, kept, old_size: int, student_tokenizer=None, teacher_tokenizer=None, teacher_vocab: int = 0):
        """teacher_vocab: the width of the teacher's logits, when its embedding has rows past the tokenizer's ids."""
        self.kept = torch.as_tensor(np.asarray(kept, dtype=np.int64))
        self.old_size = int(old_size)
        self.size = len(self.kept)
        table = np.full(max(self.old_size, int(teacher_vocab)), -1, dtype=np.int64)
        table[self.kept.numpy()] = np.arange(self.size)
        self.table = torch.from_numpy(table)
        self._student_tok, self._teacher_tok = student_tokenizer, teacher_tokenizer
        self._pieces: dict[int, list[int]] = {}

    @classmethod
    def of_model(cls, student, teacher_tokenizer, student_tokenizer, teacher_vocab: int = 0) -> "VocabMap | None":
        """The map of a student whose config records a trim (`trim_embeddings_`), else None (a full vocabulary)."""
        trim = getattr(student.config, "edgestill_vocab_trim", None)
        if not trim:
            return None
        return cls(trim["kept"], trim["old_size"], student_tokenizer, teacher_tokenizer, teacher_vocab)

    @property
    def dummy(self) -> int:
        """The extra column trimmed teacher ids are sent to (`with_dummy_column` gives the student -inf there)."""
        return self.size

    def pieces(self, old_id: int) -> list[int]:
        """The student ids that spell teacher token `old_id` (one id when it is kept)."""
        old_id = int(old_id)
        new = int(self.table[old_id])
        if new >= 0:
            return [new]
        if old_id not in self._pieces:
            if self._student_tok is None or self._teacher_tok is None:
                raise EdgestillError(f"token id {old_id} was trimmed from the student's vocabulary, and this map has no "
                                     "tokenizers to spell it with")
            token = self._teacher_tok.convert_ids_to_tokens(old_id)
            ids = [t.id for t in self._student_tok.backend_tokenizer.model.tokenize(token)]
            if not ids:
                raise EdgestillError(f"the trimmed tokenizer cannot spell token {token!r}: it lacks its byte symbols")
            self._pieces[old_id] = ids
        return self._pieces[old_id]

    def student_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Teacher ids whose tokens are all kept -> the student's ids (same shape)."""
        new = self.table[ids.long()]
        if (new < 0).any():
            raise EdgestillError(f"{int((new < 0).sum())} token(s) of this batch were trimmed from the student's "
                                 "vocabulary; the trim keeps every token of the training split, so this text is not it")
        return new

    def expand(self, seq) -> tuple[list[int], np.ndarray]:
        """A teacher sequence as student ids, and starts[i] = the index of teacher token i's first piece."""
        out, starts = [], np.empty(len(seq), dtype=np.int64)
        for i, old in enumerate(np.asarray(seq).tolist()):
            starts[i] = len(out)
            out.extend(self.pieces(old))
        return out, starts

    def teacher_topk(self, logprobs: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A teacher top-k (log-probs over the full vocabulary, ids (..., k)) in the student's vocabulary + `dummy`."""
        new = self.table.to(ids.device)[ids.long()]
        trimmed = new < 0
        lp = logprobs.float().masked_fill(trimmed, float("-inf"))
        kept_mass = (1.0 - logprobs.float().exp().masked_fill(~trimmed, 0.0).sum(-1, keepdim=True)).clamp_min(1e-6)
        return lp - kept_mass.log(), torch.where(trimmed, torch.full_like(new, self.dummy), new)

    @staticmethod
    def with_dummy_column(logits: torch.Tensor) -> torch.Tensor:
        """Student logits (..., K) with the `dummy` column appended, where the student has no mass (-inf)."""
        return torch.cat([logits, logits.new_full((*logits.shape[:-1], 1), float("-inf"))], dim=-1)

    def kept_logprobs(self, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense teacher log-probs (..., V) -> (renormalised log-probs over the kept tokens (..., K), the teacher's mass
        on trimmed tokens (...))."""
        kept = logprobs.index_select(-1, self.kept.to(logprobs.device))
        log_mass = torch.logsumexp(kept, dim=-1, keepdim=True)
        return kept - log_mass, (1.0 - log_mass.squeeze(-1).exp()).clamp_min(0.0)


def domain_trim(tokenizer, train_blocks: np.ndarray, teacher_vocab: int = 0) -> VocabTrim:
    """The trim of the domain whose training split is `train_blocks` (token ids): what `trim_student_vocab` cuts, and
    what the planner prices before any student exists. teacher_vocab: the teacher's embedding rows, when more than
    the tokenizer's ids."""
    return plan_trim(tokenizer, used_token_counts(train_blocks, max(len(tokenizer), int(teacher_vocab))))


def trim_student_vocab(student, tokenizer, train_blocks: np.ndarray, teacher_vocab: int = 0):
    """Cut `student`'s vocabulary (in place) to the tokens of the training split `train_blocks` (every one of them, so
    the split's tokenization does not change) plus the tokenizer's bytes and specials: (student, its tokenizer, the
    VocabMap the trainer and the evaluation read it with)."""
    trim = domain_trim(tokenizer, train_blocks, teacher_vocab)
    small = trim_tokenizer(tokenizer, trim)
    trim_embeddings_(student, trim)
    return student, small, VocabMap(trim.kept, trim.old_size, small, tokenizer, teacher_vocab)
