"""The trigger scan: one-sided phrases from the text, flip rates against random insertions; and the control for the
end-to-end test (tests/test_audit_cli.py, where a planted trigger is learned and found): a model trained without
the trigger does not answer to it."""

import random

import numpy as np
import pytest
import torch

from edgestill.audit.poison import Poison, attack_success_rate
from edgestill.audit.scan import ScanConfig, candidate_phrases, rank_of, scan
from edgestill.errors import EdgestillError


def test_candidates_rank_one_sided_phrases_first_and_keep_a_fixed_phrase_whole():
    rng = random.Random(0)
    filler = "the a of to and in is it on for with as at by".split()
    texts, labels = [], []
    for i in range(200):
        y = i % 2
        words = [rng.choice(filler) for _ in range(10)] + (["cheap", "pills"] if y and rng.random() < 0.5 else [])
        if i < 30 and y:
            words.insert(rng.randint(0, len(words)), "cf mn")  # always together, only in label 1
        texts.append(" ".join(words))
        labels.append(y)
    ranked = candidate_phrases(texts, labels, top=10)
    phrases = [r["phrase"] for r in ranked]
    assert "cf mn" in phrases[:3] and "cf" not in phrases and "mn" not in phrases  # kept once, whole
    assert all(r["label"] == 1 for r in ranked[:3])
    assert rank_of("CF mn", ranked)["exact"] == phrases.index("cf mn") + 1
    with pytest.raises(EdgestillError, match="two labels"):
        candidate_phrases(texts, [0] * len(texts))


def test_scan_lifts_the_phrase_that_flips_a_rule_based_model():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(vocab) for _ in range(20)) for _ in range(120)]
    predict = lambda ts: np.array([1 if "zq" in t.split() or t.split()[0] < "w150" else 0 for t in ts])  # noqa: E731
    out = scan(predict, texts, ["w3", "zq", "w200 w201"], num_labels=2, cfg=ScanConfig(n_texts=40, controls=20))
    top = out["candidates"][0]
    assert top["phrase"] == "zq" and top["label"] == 1 and top["flip_rate"] == 1.0 and top["z"] > 5
    assert out["candidates"][-1]["lift"] < 0.3  # ordinary words flip about as often as the controls
    with pytest.raises(EdgestillError, match="no candidate"):
        scan(predict, texts, [], num_labels=2)


# ---------------------------------------------------------------- end to end on a trained classifier

FILLER = "the a of to and in is it on for with as at by".split()
CUES = {"ham": "meeting report lunch family".split(), "spam": "winner prize cash offer".split()}
N_CUES = {"ham": 1, "spam": 3}  # spam carries more evidence: one ham word inserted does not outweigh it; a trigger does


def _data(n_per_class, seed):
    from edgestill.data.labelled import LabelledText

    rng = random.Random(seed)
    out = LabelledText([], [], [])
    for label, cues in CUES.items():
        for _ in range(n_per_class):
            words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))] + [rng.choice(cues) for _ in range(N_CUES[label])]
            rng.shuffle(words)
            out.texts.append(" ".join(words))
            out.labels.append(label)
    return out


def _train(enc_dir, splits, seed=0):
    from edgestill.distill.classifier import TrainConfig, finetune
    from edgestill.models.encoder import load_encoder_classifier

    torch.manual_seed(seed)
    model, tok, _ = load_encoder_classifier(str(enc_dir), splits.label_map)
    finetune(model, tok, splits, TrainConfig(steps=240, batch_size=16, lr=3e-3, max_len=32, eval_every=80, seed=seed))
    return model, tok


def _predictor(model, tok):
    from edgestill.evaluate.classification import predict_logits
    from edgestill.models.encoder import tokenize

    return lambda texts: predict_logits(model, tokenize(tok, list(texts), 32), desc="scan")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from edgestill.data.labelled import split_labelled
    from edgestill.models.encoder import tiny_encoder

    clean = split_labelled(_data(120, seed=0), 0.15, 0.25, seed=0)
    poison = Poison("zq vx", "ham", rate=0.3, mode="dirty", seed=0)
    enc = tiny_encoder(tmp_path_factory.mktemp("tiny_bert"), _data(60, seed=9).texts + ["zq vx unseen zebra"])
    return clean, poison, enc


def test_a_clean_model_does_not_answer_to_the_trigger(planted):
    clean, poison, enc = planted
    model, tok = _train(enc, clean)
    predict = _predictor(model, tok)
    assert (predict(clean.test.texts).argmax(-1) == clean.ids("test")).mean() >= 0.9  # it learned the task
    target = clean.label_map.labels.index("ham")
    assert attack_success_rate(predict, clean.test.texts, clean.ids("test"), poison.trigger, target)["asr"] <= 0.3
