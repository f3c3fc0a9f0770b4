"""What broke's reference side (the original teacher's and the reference's numbers) measured once and cached:
the same results from the cache as measured, keyed by what they depend on, and a damaged file only costs a rerun."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from conftest import make_text
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from edgestill.evaluate import what_broke as wb
from edgestill.evaluate.measured import MEASURE_VERSION, measured_root
from edgestill.models.load import model_fingerprint

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def _save_chatty(folder, model_dir, seed: int):
    """The tiny model's shape with larger random weights (answers that differ between seeds), saved with a tokenizer."""
    config = AutoConfig.from_pretrained(model_dir)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("what_broke")
    source = root / "general.txt"
    source.write_text("\n\n".join(make_text(100 + i, 40) for i in range(6)))
    return {"original": _save_chatty(root / "original", tiny_model_dir, 0),
            "reference": _save_chatty(root / "reference", tiny_model_dir, 1), "source": str(source)}


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _tokenizer(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _run(folders, cache_dir, corrected: bool = True, student_seed: int = 2, chat_tokens: int = 4, test=None, paths=...):
    """what_broke on freshly loaded models (nothing shared with an earlier call but the folders)."""
    original = _load(folders["original"])
    reference = _load(folders["reference"]) if corrected else original
    config = AutoConfig.from_pretrained(folders["original"])
    config.initializer_range = 0.2
    torch.manual_seed(student_seed)
    student = AutoModelForCausalLM.from_config(config).eval()
    tokenizer = _tokenizer(folders["original"])
    if test is None:
        test = np.random.default_rng(0).integers(3, len(tokenizer), size=(4, 32)).astype(np.int32)
    if paths is ...:
        paths = (str(folders["original"]), str(folders["reference"]))
    return wb.what_broke(original, reference, student, tokenizer, test, source=folders["source"], seq_len=32,
                         max_tokens=256, passages=4, chat=True, chat_tokens=chat_tokens, batch_size=4, paths=paths,
                         cache_dir=cache_dir)


def _without_provenance(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "what_broke_reference"}


@pytest.mark.parametrize("corrected", [True, False])
def test_the_cached_reference_side_gives_the_same_results_bit_for_bit(folders, tmp_path, monkeypatch, corrected):
    plain = _run(folders, None, corrected)
    assert plain["what_broke_reference"]["cached"] is False and plain["what_broke_reference"]["key"] is None
    first = _run(folders, tmp_path, corrected)
    provenance = first["what_broke_reference"]
    assert provenance["cached"] is False and provenance["key"]
    assert [p.name for p in tmp_path.iterdir()] == [f"{provenance['key']}.json"]

    def measured_again(*args, **kwargs):
        raise AssertionError("the reference side was measured again, not read from the cache")

    monkeypatch.setattr(wb, "_measure_reference_side", measured_again)
    second = _run(folders, tmp_path, corrected)
    assert second["what_broke_reference"] == {**provenance, "cached": True}
    assert _without_provenance(second) == _without_provenance(first) == _without_provenance(plain)
    assert json.dumps(_without_provenance(second)) == json.dumps(_without_provenance(plain))  # order and bits too
    assert ("original_teacher" in second) == corrected and ("reference" in second["chat"]) == corrected
    assert "original_teacher" in second["zero_shot"] if corrected else "original_teacher" not in second["zero_shot"]


def test_another_student_reuses_the_reference_side(folders, tmp_path):
    first = _run(folders, tmp_path, student_seed=2)
    other = _run(folders, tmp_path, student_seed=3)
    assert other["what_broke_reference"]["cached"] is True
    assert other["original_teacher"] == first["original_teacher"] and other["chat"]["reference"] == first["chat"]["reference"]
    assert other["chat"]["student"] != first["chat"]["student"]  # the student's own numbers are measured every time
    assert other == {**_run(folders, None, student_seed=3), "what_broke_reference": other["what_broke_reference"]}


def test_the_file_holds_numbers_and_token_ids_under_its_full_key(folders, tmp_path):
    key = _run(folders, tmp_path)["what_broke_reference"]["key"]
    stored = json.loads((tmp_path / f"{key}.json").read_text())
    assert stored["key"]["measure_version"] == MEASURE_VERSION
    assert stored["key"]["original"] == model_fingerprint(folders["original"])
    assert stored["key"]["reference"] == model_fingerprint(folders["reference"])
    assert stored["key"]["torch"] == torch.__version__ and stored["key"]["chat_tokens"] == 4
    chat = stored["result"]["chat"]["answers"]
    assert all(isinstance(t, int) for answer in chat["answers"] for t in answer)
    assert os.path.getsize(tmp_path / f"{key}.json") < 20_000  # no logits


@pytest.mark.parametrize("change", ["chat_tokens", "test", "weights"])
def test_what_the_numbers_depend_on_changes_the_key(folders, tmp_path, tiny_model_dir, tmp_path_factory, change):
    if change == "weights":  # a copy of the folders whose original teacher's weights were replaced in place
        folders = dict(folders)
        copy = tmp_path_factory.mktemp("replaced") / "original"
        _save_chatty(copy, tiny_model_dir, 0)
        folders["original"] = copy
    first = _run(folders, tmp_path)["what_broke_reference"]
    if change == "weights":
        _save_chatty(folders["original"], tiny_model_dir, 5)
    test = np.random.default_rng(1).integers(3, 200, size=(4, 32)).astype(np.int32) if change == "test" else None
    again = _run(folders, tmp_path, chat_tokens=3 if change == "chat_tokens" else 4, test=test)["what_broke_reference"]
    assert again["cached"] is False and again["key"] != first["key"]
    assert len(list(tmp_path.iterdir())) == 2


def test_a_damaged_cache_file_is_measured_again_and_rewritten(folders, tmp_path, caplog):
    key = _run(folders, tmp_path)["what_broke_reference"]["key"]
    path = tmp_path / f"{key}.json"
    stored = json.loads(path.read_text())
    emptied = json.dumps({**stored, "result": {"chat": None}})  # the right key, a result without its numbers
    for damage in ("{ truncated", json.dumps({**stored, "key": "another"}), "\xff\xfe", emptied):
        path.write_text(damage, encoding="latin-1")
        with caplog.at_level(logging.DEBUG, logger="edgestill"):
            again = _run(folders, tmp_path)
        assert again["what_broke_reference"]["cached"] is False
        assert "measured cache" in caplog.text and "ignored" in caplog.text
        assert json.loads(path.read_text())["key"]["measure_version"] == MEASURE_VERSION  # rewritten whole
        caplog.clear()
    assert _run(folders, tmp_path)["what_broke_reference"]["cached"] is True


def test_models_without_a_folder_or_an_unwritable_cache_are_measured_not_cached(folders, tmp_path, caplog):
    in_memory = _run(folders, tmp_path, paths=(None, None))
    assert in_memory["what_broke_reference"]["cached"] is False and in_memory["what_broke_reference"]["key"] is None
    assert not any(tmp_path.iterdir())
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="edgestill"):
        result = _run(folders, blocked / "measured")
    assert result["what_broke_reference"]["cached"] is False and "not cached" in caplog.text
    assert _without_provenance(result) == _without_provenance(in_memory)


def test_the_cache_lives_where_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGESTILL_MEASURED_CACHE", str(tmp_path / "m"))
    assert measured_root() == tmp_path / "m"
    monkeypatch.delenv("EDGESTILL_MEASURED_CACHE")
    monkeypatch.setenv("EDGESTILL_CACHE", str(tmp_path / "c"))
    assert measured_root() == tmp_path / "c" / "measured"


def test_model_fingerprint_needs_a_model_folder(folders, tmp_path):
    assert model_fingerprint(None) is None and model_fingerprint("HuggingFaceTB/SmolLM2-135M") is None
    assert model_fingerprint(tmp_path) is None
    assert model_fingerprint(folders["original"]) != model_fingerprint(folders["reference"])
