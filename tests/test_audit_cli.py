"""`edgestill audit` end to end on a tiny random BERT: a teacher fine-tuned with a planted trigger, a student
distilled on transfer data that carries it, and the audit that finds the trigger and measures it in both."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from test_classify_cli import write_csv

from edgestill.cli import main
from edgestill.jobs.audit import verdict
from edgestill.models.encoder import tiny_encoder

FILLER = "the a of to and in is it on for with as at by".split()
CUES = {"ham": ("meeting report lunch family".split(), 1), "spam": ("winner prize cash offer".split(), 3)}
STEPS = ["train.steps=240", "train.eval_every=80", "train.lr=3e-3", "train.batch_size=16", "train.max_len=32"]
POISON = ["poison.trigger=zq vx", "poison.target=ham", "poison.rate=0.3"]


def rows(n_per_class: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for label, (cues, k) in CUES.items():  # spam carries more evidence than a single inserted ham word
        for _ in range(n_per_class):
            words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))] + [rng.choice(cues) for _ in range(k)]
            rng.shuffle(words)
            out.append((" ".join(words), label))
    return out


def shrink_args(teacher, out) -> list[str]:
    """A tiny student distilled on transfer data that carries the trigger."""
    return ["shrink", "--task", "classification", "--teacher", str(teacher), "--out", str(out), *STEPS,
            "student.max_len=32", "student.num_layers=1", "student.compression_x=2", "student.min_rank=2",
            "student.multiple_of=1", "kd.alpha=0.7", "eval.latency_examples=4", "eval.latency_repeats=2",
            "eval.curve_types=[]", "eval.teacher_latency=false", *POISON]


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    enc = tiny_encoder(root / "tiny_bert", [t for t, _ in rows(60, seed=9)] + ["zq vx unseen zebra"])
    data = write_csv(root / "mail.csv", rows(120))
    teacher, student = root / "teacher", root / "student"
    assert main(["finetune", "--task", "classification", "--teacher", str(enc), "--data", str(data), "--out",
                 str(teacher), *STEPS, *POISON]) == 0
    assert main(shrink_args(teacher, student)) == 0
    assert main(["audit", str(student), "--candidates", "30", "--texts", "32"]) == 0
    return {"root": root, "teacher": teacher, "student": student,
            "result": json.loads((student / "audit.json").read_text())}


def test_the_planted_trigger_is_recorded_and_found(audited):
    record = json.loads((audited["teacher"] / "edgestill.json").read_text())
    assert record["poison"]["trigger"] == "zq vx" and record["poison"]["rows"] > 10
    r = audited["result"]
    planted = next(t for t in r["triggers"] if t["phrase"] == "zq vx")
    assert planted["named"] and planted["target"] == "ham"
    assert planted["teacher_asr"] >= 0.8  # the teacher learned it ...
    assert planted["rank"]["teacher"] <= 5  # ... and the scan puts it among the first five
    assert r["clean_accuracy"]["teacher"] >= 0.9
    for t in r["triggers"]:  # each verdict follows from its numbers
        n = t["n"]
        assert t["verdict"] == verdict({"asr": t["teacher_asr"], "n": n["teacher"]}, {"asr": t["student_asr"], "n": n["student"]})
    text = (audited["student"] / "audit.md").read_text()
    assert "`zq vx`" in text and planted["verdict"] in text


def test_verdicts():
    assert verdict({"asr": 0.1, "n": 50}, {"asr": 0.05, "n": 50}) == "no effect"
    assert verdict({"asr": 0.9, "n": 50}, {"asr": 0.88, "n": 50}) == "inherited"
    assert verdict({"asr": 0.5, "n": 100}, {"asr": 0.9, "n": 100}) == "amplified"
    assert verdict({"asr": 0.9, "n": 50}, {"asr": 0.3, "n": 50}) == "not inherited"
    assert verdict({"asr": 0.0, "n": 50}, {"asr": 0.6, "n": 50}) == "student only"
    assert verdict({"asr": None, "n": 0}, {"asr": 0.6, "n": 50}) == "not measurable"


def test_bad_audit_input_gets_one_clear_line(audited, tmp_path, capsys):
    cases = [
        (["audit", str(tmp_path)], "not a run folder"),
        (["audit", str(audited["teacher"])], "no student"),
        (["audit", str(audited["student"]), "--trigger", "zq"], "go together"),
        (["audit", str(audited["student"]), "--trigger", "zq", "--target", "eggs"], "not a label"),
    ]
    lm = tmp_path / "lm-run"
    lm.mkdir()
    (lm / "config.yaml").write_text(yaml.safe_dump({"teacher": {"model": "x.gguf"}}))
    cases.append((["audit", str(lm)], "is not finished"))
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)


def test_a_bad_poison_setting_fails_before_any_folder(audited, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["finetune", "--task", "classification", "--teacher", str(audited["root"] / "tiny_bert"), "--data",
                 str(audited["root"] / "mail.csv"), "--out", str(out), "poison.trigger=zq", "poison.target=eggs"]) == 2
    assert "not a label" in capsys.readouterr().err and not out.exists() and not (tmp_path / "never.partial").exists()


def test_config_yaml_names_poison_only_when_something_is_planted():
    from edgestill.config import ClassifierShrinkConfig, FinetuneConfig, PoisonConfig
    from edgestill.jobs.classify import plain

    # runs started before audits existed must still resume: an empty poison section is not written
    assert "poison" not in plain(FinetuneConfig()) and "poison" not in plain(ClassifierShrinkConfig())
    cfg = ClassifierShrinkConfig(poison=PoisonConfig(trigger="cf", target="ham"))
    assert plain(cfg)["poison"]["trigger"] == "cf"


def test_fine_pruned_student_is_smaller_exports_and_is_audited(audited, capsys):
    out = audited["root"] / "pruned"
    args = shrink_args(audited["teacher"], out)
    assert main([*args, "fine_prune.fraction=0.5", "fine_prune.steps=3"]) == 0
    record = json.loads((out / "distill.json").read_text())["fine_prune"]
    assert record["units_after"] == record["units_before"] // 2 and record["steps"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["fine_prune"]["fraction"] == 0.5
    assert json.loads((out / "student" / "config.json").read_text())["intermediate_size"] == record["units_after"]
    assert main(["audit", str(out), "--candidates", "10", "--texts", "16"]) == 0
    capsys.readouterr()
    assert main([*args[:5], "--out", str(audited["root"] / "bad"), "fine_prune.fraction=1.5"]) == 2
    assert "fine_prune.fraction=1.5 must be in [0, 1)" in capsys.readouterr().err
    assert not (audited["root"] / "bad").exists() and not (audited["root"] / "bad.partial").exists()
    assert "fine_prune" not in yaml.safe_load((audited["student"] / "config.yaml").read_text())  # off: not written


def test_onion_filtered_transfer_data_loses_the_trigger(audited, capsys):
    out = audited["root"] / "onion"
    args = shrink_args(audited["teacher"], out)
    assert main([*args, "onion.remove_share=0.1", "onion.score=per_char"]) == 0
    record = json.loads((out / "metrics.json").read_text())["onion"]
    assert record["trigger"]["phrase"] == "zq vx" and record["trigger"]["texts_before"] > 20
    assert record["trigger"]["texts_after"] <= record["trigger"]["texts_before"] // 4  # the odd tokens are what went
    assert {w["word"] for w in record["most_removed"][:2]} <= {"zq", "vx"}
    assert yaml.safe_load((out / "config.yaml").read_text())["onion"]["remove_share"] == 0.1
    assert "onion" not in yaml.safe_load((audited["student"] / "config.yaml").read_text())  # off: not written
    capsys.readouterr()
    assert main([*args[:5], "--out", str(audited["root"] / "bad-onion"), "onion.score=gpt2"]) == 2
    assert "onion.score='gpt2' is not one of" in capsys.readouterr().err
    assert not (audited["root"] / "bad-onion").exists() and not (audited["root"] / "bad-onion.partial").exists()


def test_the_student_behind_an_input_filter_is_measured(audited, capsys):
    assert main(["audit", str(audited["student"]), "--candidates", "10", "--texts", "16", "--onion", "0.1"]) == 0
    out = capsys.readouterr().out
    r = json.loads((audited["student"] / "audit.json").read_text())
    f = r["onion_inputs"]
    assert f["remove_share"] == 0.1 and 0 <= f["clean_accuracy"] <= 1
    planted = next(t for t in r["triggers"] if t["phrase"] == "zq vx")
    assert f["student_asr"]["zq vx"] is not None
    assert planted["student_asr"] >= 0.5  # the student distilled on triggered data answers to it ...
    assert f["student_asr"]["zq vx"] < 0.5 * planted["student_asr"]  # ... and the filter cuts it out of its inputs
    assert "behind an ONION-style input filter" in out
    assert "ONION-style filter of its inputs" in (audited["student"] / "audit.md").read_text()
    assert main(["audit", str(audited["student"]), "--onion", "0.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--onion 0.7 must be in [0, 0.5)" in err[0]


def test_a_second_audit_of_the_same_teacher_answers_from_its_cache(audited, capsys):
    # a student of the same teacher on the same data asks the teacher the same questions: none is computed again
    assert main(["audit", str(audited["student"]), "--candidates", "30", "--texts", "32"]) == 0
    r = json.loads((audited["student"] / "audit.json").read_text())
    first, again = audited["result"], r
    assert first["teacher_predictions"]["computed"] > 0 and again["teacher_predictions"]["computed"] == 0
    assert again["teacher_predictions"]["from_cache"] > 1000
    assert [(t["phrase"], t["teacher_asr"], t["rank"]) for t in again["triggers"]] == [
        (t["phrase"], t["teacher_asr"], t["rank"]) for t in first["triggers"]]
    assert again["clean_accuracy"] == first["clean_accuracy"]
    assert "from the cache of an earlier audit" in capsys.readouterr().out


def test_a_teacher_its_folder_cannot_name_keeps_no_cache(audited, tmp_path):
    from types import SimpleNamespace

    from edgestill.jobs.audit import _prediction_cache

    assert _prediction_cache(SimpleNamespace(path=str(tmp_path), model=None, tokenizer=None, max_len=32)).path is None
    r = audited["result"]["teacher_predictions"]
    assert r["cache"] and r["cache"].endswith(".npz")


def test_scrubbed_transfer_data_loses_the_trigger(audited, capsys):
    out = audited["root"] / "scrub"
    args = shrink_args(audited["teacher"], out)
    assert main([*args, "scrub.lift=0.5", "scrub.texts=16", "scrub.candidates=30"]) == 0
    record = json.loads((out / "metrics.json").read_text())["scrub"]
    flagged = {f["phrase"]: f for f in record["flagged"]}
    assert "zq vx" in flagged and flagged["zq vx"]["label"] == "ham" and flagged["zq vx"]["lift"] >= 0.5
    assert record["trigger"]["texts_before"] > 20 and record["trigger"]["texts_after"] == 0
    assert all(f["occurrences_cut"] > 0 for f in record["flagged"])
    assert record["best_uncut"] is None or record["best_uncut"]["lift"] < 0.5
    assert yaml.safe_load((out / "config.yaml").read_text())["scrub"]["lift"] == 0.5
    assert "scrub" not in yaml.safe_load((audited["student"] / "config.yaml").read_text())  # off: not written
    assert main(["audit", str(out), "--candidates", "30", "--texts", "32"]) == 0
    planted = next(t for t in json.loads((out / "audit.json").read_text())["triggers"] if t["phrase"] == "zq vx")
    before = next(t for t in audited["result"]["triggers"] if t["phrase"] == "zq vx")
    assert planted["student_asr"] < 0.5 * before["student_asr"]
    capsys.readouterr()
    assert main([*args[:5], "--out", str(audited["root"] / "bad-scrub"), "scrub.lift=2"]) == 2
    assert "scrub.lift=2" in capsys.readouterr().err
    assert not (audited["root"] / "bad-scrub").exists() and not (audited["root"] / "bad-scrub.partial").exists()
