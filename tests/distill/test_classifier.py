import random

import numpy as np
import pytest
import torch

from edgestill.data.labelled import LabelledText, split_labelled
from edgestill.distill.classifier import (
    KDConfig,
    StudentConfig,
    TrainConfig,
    build_student,
    check_kd_config,
    distill_classifier,
    finetune,
    hidden_mse,
    kd_logits_loss,
)
from edgestill.errors import EdgestillError
from edgestill.evaluate.classification import predict_logits, scores, tfidf_baseline
from edgestill.models.encoder import load_encoder_classifier, save_classifier, tiny_encoder, tokenize
from edgestill.models.lowrank import FactorizedEmbedding, LowRankLinear, stored_params

FILLER = "the a of to and in is it on for with as at by".split()
CUES = {"fruit": "apple banana cherry mango".split(), "tool": "hammer wrench saw drill".split(),
        "pet": "cat dog parrot hamster".split()}


def make_data(n_per_class=40, seed=0) -> LabelledText:
    rng = random.Random(seed)
    out = LabelledText([], [], [])
    for label, cues in CUES.items():
        for i in range(n_per_class):
            words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))] + [rng.choice(cues) for _ in range(2)]
            rng.shuffle(words)
            out.texts.append(" ".join(words))
            out.labels.append(label)
    return out


@pytest.fixture(scope="module")
def splits():
    return split_labelled(make_data(), 0.15, 0.25, seed=0)


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("tiny_bert"), make_data(60, seed=9).texts + ["unseen zebra words"])


@pytest.fixture(scope="module")
def teacher(enc_dir, splits):
    torch.manual_seed(0)
    model, tok, _ = load_encoder_classifier(str(enc_dir), splits.label_map)
    result = finetune(model, tok, splits, TrainConfig(steps=120, batch_size=16, lr=3e-3, max_len=24, eval_every=40))
    return model, tok, result


def test_kd_loss_is_zero_for_equal_logits_and_scales_with_t_squared():
    t = torch.randn(4, 3)
    assert kd_logits_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(4, 3)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.softmax(t, -1), reduction="batchmean")
    assert kd_logits_loss(s, t, 1.0).item() == pytest.approx(ref.item(), rel=1e-5)
    assert kd_logits_loss(s, t, 4.0).item() != pytest.approx(kd_logits_loss(s, t, 1.0).item())


def test_hidden_mse_ignores_padding():
    a, b = torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8)  # (layers, B, T, C)
    b[1, 0, 3] = 100.0  # layer 1, padded position 3
    mask = torch.tensor([[1, 1, 1, 0]])
    assert hidden_mse(a, b, [(1, 1)], mask).item() == 0.0
    b[1, 0, 0] = 2.0
    assert hidden_mse(a, b, [(1, 1)], mask).item() == pytest.approx(8 * 2.0**2 / (3 * 8))  # 8 channels of error 2, 3 real positions


def test_finetune_learns_the_task(teacher, splits):
    model, tok, result = teacher
    assert result["test"]["accuracy"] >= 0.9  # chance is 1/3
    assert result["best_step"] in (40, 80, 120) and len(result["history"]) == 3
    assert set(result["test"]) == {"accuracy", "macro_f1", "n"} and result["test"]["n"] == len(splits.test)


def test_student_is_smaller_and_factorized(teacher, splits):
    model, tok, _ = teacher
    target = stored_params(model) // 4
    student, s_tok, table, info = build_student(model, tok, splits.train.texts,
                                                StudentConfig(num_layers=1, max_len=24, target_params=target, min_rank=2,
                                                              multiple_of=1))
    assert info["teacher_layers"] == [1] and len(student.bert.encoder.layer) == 1
    assert stored_params(student) <= target and info["params_x_smaller"] >= 4
    assert info["vocab_kept"] < model.config.vocab_size == info["teacher_vocab"]
    assert student.config.vocab_size == len(s_tok) == info["vocab_kept"]
    assert student.bert.embeddings.position_embeddings.num_embeddings == 24  # cut to max_len
    assert isinstance(student.bert.embeddings.word_embeddings, FactorizedEmbedding)
    assert any(isinstance(m, LowRankLinear) for m in student.modules())
    # the student starts from the teacher: it already agrees with it more than chance
    enc = tokenize(s_tok, splits.test.texts, 24)
    assert student(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.shape == (len(splits.test), 3)


def test_student_without_factorization_reproduces_sliced_teacher(teacher, splits):
    model, tok, _ = teacher
    student, s_tok, table, info = build_student(model, tok, splits.train.texts,
                                                StudentConfig(num_layers=2, max_len=24, target_params=10**9))
    assert info["ranks"] == {"linear": {}, "embedding": {}}
    enc_t = tokenize(tok, splits.train.texts[:8], 24)
    enc_s = dict(enc_t, input_ids=table[enc_t["input_ids"]])
    with torch.no_grad():
        a = model(**{k: torch.from_numpy(v) for k, v in enc_t.items()}).logits
        b = student(**{k: torch.from_numpy(v) for k, v in enc_s.items()}).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # all layers kept + trimmed vocab: the same function


def _student(model, tok, splits):
    torch.manual_seed(0)
    return build_student(model, tok, splits.train.texts,
                         StudentConfig(num_layers=1, max_len=24, target_params=stored_params(model) // 4, min_rank=2,
                                       multiple_of=1))


def test_kd_moves_the_student_towards_the_teacher(teacher, splits, tmp_path):
    model, tok, _ = teacher
    cfg = TrainConfig(steps=40, batch_size=16, lr=3e-3, max_len=24, eval_every=20)
    enc_test_t = tokenize(tok, splits.test.texts, 24)
    t_logits = predict_logits(model, enc_test_t)

    def kl_to_teacher(student, s_tok):
        s_logits = predict_logits(student, tokenize(s_tok, splits.test.texts, 24))
        return float(kd_logits_loss(torch.from_numpy(s_logits), torch.from_numpy(t_logits), 1.0))

    student, s_tok, table, _ = _student(model, tok, splits)
    before = kl_to_teacher(student, s_tok)
    result = distill_classifier(model, student, tok, splits, table, s_tok, cfg,
                                KDConfig(temperature=2.0, alpha=0.9, hidden_weight=0.1))
    after = kl_to_teacher(student, s_tok)
    assert after < before
    assert {"ce", "kl", "hidden_mse"} <= set(result["history"][-1])
    assert result["test"]["accuracy"] >= 0.6
    # the distilled student saves with its trimmed tokenizer and label map, and reloads exactly
    out = save_classifier(student, s_tok, splits.label_map, tmp_path / "student")
    again, tok2, lm = load_encoder_classifier(str(out))
    assert lm == splits.label_map and len(tok2) == len(s_tok)
    enc = tokenize(tok2, splits.test.texts, 24)
    np.testing.assert_array_equal(enc["input_ids"], tokenize(s_tok, splits.test.texts, 24)["input_ids"])
    np.testing.assert_allclose(predict_logits(again, enc), predict_logits(student, enc), atol=1e-6)


def test_relation_kd_alone_moves_the_students_embedding_geometry_towards_the_teacher(teacher, splits):
    from edgestill.distill.classifier import pooled_relation_loss

    model, tok, _ = teacher
    texts = splits.test.texts[:24]

    def relation_gap(student, s_tok):
        enc_t = {k: torch.from_numpy(v) for k, v in tokenize(tok, texts, 24).items()}
        enc_s = {k: torch.from_numpy(v) for k, v in tokenize(s_tok, texts, 24).items()}
        with torch.no_grad():
            t = model(**enc_t, output_hidden_states=True).hidden_states[-1]
            s = student(**enc_s, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(enc_t["attention_mask"], enc_s["attention_mask"])  # the same pieces, renumbered
        return float(pooled_relation_loss(s, t, enc_s["attention_mask"]))

    student, s_tok, table, _ = _student(model, tok, splits)
    before = relation_gap(student, s_tok)
    result = distill_classifier(model, student, tok, splits, table, s_tok,
                                TrainConfig(steps=30, batch_size=16, lr=3e-3, max_len=24, eval_every=0),
                                KDConfig(alpha=0.0, relation_weight=1.0))
    assert "relation" in result["history"][-1] and "kl" not in result["history"][-1]
    assert relation_gap(student, s_tok) < before
    with pytest.raises(EdgestillError, match="relation_weight"):
        check_kd_config(KDConfig(relation_weight=-1.0))


def test_ce_only_does_not_touch_the_teacher(teacher, splits):
    model, tok, _ = teacher
    student, s_tok, table, _ = _student(model, tok, splits)

    class Boom(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("teacher was called")

    result = distill_classifier(Boom(), student, tok, splits, table, s_tok,
                                TrainConfig(steps=10, batch_size=8, lr=3e-3, max_len=24, eval_every=0),
                                KDConfig(alpha=0.0, hidden_weight=0.0))
    assert "kl" not in result["history"][-1] and result["best_step"] == 10


def test_scores_and_tfidf_baseline(splits):
    s = scores([0, 0, 1, 2], [0, 1, 1, 1], num_labels=3)
    assert s["accuracy"] == 0.5 and s["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0.0) / 3)  # per-class F1 averaged
    base = tfidf_baseline(splits)
    assert base["test"]["accuracy"] >= 0.9 and base["C"] in (1.0, 10.0, 100.0)
    assert base["params"] == base["vocabulary"] * 3 + 3
    # its size counts the vocabulary it must ship, not only the weights
    assert base["vocabulary_bytes"] > base["vocabulary"] and base["deploy_bytes"] == base["weight_bytes_fp32"] + base["vocabulary_bytes"]


# ---------------------------------------------------------------- early stopping on a rigged validation curve


def _rig(monkeypatch, curve: list[float]) -> list[dict]:
    """Replace the validation with `curve` (one value per validation, as val macro-F1 and 1 - it as val loss);
    returns the model state seen at each validation."""
    from edgestill.distill import classifier

    seen = []

    def rigged(model, enc, labels, batch_size=64):
        value = curve[len(seen)]
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"accuracy": value, "macro_f1": value, "n": len(labels), "loss": 1.0 - value}

    monkeypatch.setattr(classifier, "validation_scores", rigged)
    return seen


def _train(enc_dir, splits, cfg: TrainConfig):
    from edgestill.distill.classifier import train_classifier

    torch.manual_seed(0)
    model, tok, _ = load_encoder_classifier(str(enc_dir), splits.label_map)
    enc = {k: tokenize(tok, getattr(splits, k).texts, 24) for k in ("train", "val")}
    return model, train_classifier(model, enc["train"], splits.ids("train"), enc["val"], splits.ids("val"), cfg)


def _same_state(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("select_on", ["macro_f1", "loss"])
def test_early_stopping_stops_after_patience_and_restores_the_best_step(enc_dir, splits, monkeypatch, select_on):
    # best at the 2nd validation (step 4); an equal value is no improvement; the late 0.99 is never reached
    seen = _rig(monkeypatch, [0.40, 0.70, 0.65, 0.70, 0.60, 0.99, 0.99])
    cfg = TrainConfig(steps=100, batch_size=8, lr=3e-3, max_len=24, eval_every=2, patience=3, select_on=select_on)
    model, result = _train(enc_dir, splits, cfg)
    assert len(seen) == 5 and result["stopped_early"] is True
    assert result["stopped_at_step"] == 10 and result["best_step"] == 4 and result["max_steps"] == 100
    assert [p["step"] for p in result["val_curve"]] == [2, 4, 6, 8, 10]
    assert [p["val_macro_f1"] for p in result["val_curve"]] == [0.40, 0.70, 0.65, 0.70, 0.60]
    assert result["best_val_macro_f1"] == 0.70 and result["best_val_loss"] == pytest.approx(0.30)
    assert _same_state(model, seen[1]) and not _same_state(model, seen[-1])  # the best state, not the last one


def test_min_delta_and_no_patience(enc_dir, splits, monkeypatch):
    seen = _rig(monkeypatch, [0.50, 0.505, 0.51, 0.52])
    cfg = TrainConfig(steps=100, batch_size=8, lr=3e-3, max_len=24, eval_every=2, patience=2, min_delta=0.015)
    model, result = _train(enc_dir, splits, cfg)  # +0.005 and +0.01 are below min_delta: 2 stale validations
    assert result["stopped_at_step"] == 6 and result["best_step"] == 2 and _same_state(model, seen[0])
    seen = _rig(monkeypatch, [0.9, 0.5, 0.4])
    model, result = _train(enc_dir, splits, TrainConfig(steps=6, batch_size=8, lr=3e-3, max_len=24, eval_every=2))
    assert result["stopped_early"] is False and result["stopped_at_step"] == 6 and result["best_step"] == 2  # patience 0
    assert _same_state(model, seen[0])


def test_bad_early_stopping_settings_are_refused():
    from edgestill.distill.classifier import check_train_config

    with pytest.raises(EdgestillError, match="select_on"):
        check_train_config(TrainConfig(select_on="accuracy"))
    with pytest.raises(EdgestillError, match="eval_every > 0"):
        check_train_config(TrainConfig(patience=3, eval_every=0))


def test_augmented_transfer_set_is_labelled_by_the_teacher_only(teacher, splits):
    model, tok, _ = teacher
    student, s_tok, table, _ = _student(model, tok, splits)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        result = distill_classifier(model, student, tok, splits, table, s_tok,
                                    TrainConfig(steps=12, batch_size=16, lr=3e-3, max_len=24, eval_every=0),
                                    KDConfig(alpha=0.7, augment=3))
    finally:
        handle.remove()
    n = len(splits.train.texts)
    assert result["transfer_set"] == {"labelled": n, "augmented": 3 * n, "unlabelled": 0}
    assert len(calls) == -(-4 * n // 64)  # the teacher's logits: one pass over the transfer set, before training
    assert {"ce", "kl"} <= set(result["history"][-1])


def test_transfer_texts_get_the_teachers_labels_only_and_the_students_own_pieces(teacher, splits, monkeypatch):
    """kd.transfer: unlabelled texts join the transfer set with no gold label; the student reads them through its
    trimmed tokenizer (a word it never kept falls back to [UNK], as on a device), the teacher through its own."""
    import edgestill.distill.classifier as clf

    model, tok, _ = teacher
    student, s_tok, table, _ = _student(model, tok, splits)
    transfer = ["unseen zebra words with apple", "hammer and cat"]
    seen, calls = {}, []
    real = clf.train_classifier

    def spy(model_, s_train, y_train, *args, **kwargs):
        seen.update(s_train=s_train, y=y_train)
        return real(model_, s_train, y_train, *args, **kwargs)

    monkeypatch.setattr(clf, "train_classifier", spy)
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        result = distill_classifier(model, student, tok, splits, table, s_tok,
                                    TrainConfig(steps=6, batch_size=16, lr=3e-3, max_len=24, eval_every=0),
                                    KDConfig(alpha=0.7, augment=1, transfer="given"), transfer_texts=transfer)
    finally:
        handle.remove()
    n = len(splits.train.texts)
    assert result["transfer_set"] == {"labelled": n, "augmented": n, "unlabelled": 2}
    assert (seen["y"][:n] >= 0).all() and (seen["y"][n:] == -100).all()
    own = tokenize(s_tok, transfer, 24)
    np.testing.assert_array_equal(seen["s_train"]["input_ids"][-2:], own["input_ids"])
    assert s_tok.unk_token_id in own["input_ids"][0]  # 'zebra' is not in the trimmed vocabulary
    mapped = table[tokenize(tok, splits.train.texts[:3], 24)["input_ids"]]  # the labelled texts: the teacher's pieces
    np.testing.assert_array_equal(seen["s_train"]["input_ids"][:3], mapped)
    assert len(calls) == -(-(2 * n + 2) // 64)  # the teacher labels all of it in one pass before training


@pytest.mark.parametrize("kd, match", [
    (KDConfig(alpha=0.0, transfer="t.txt"), "kd.transfer='t.txt'.*need kd.alpha > 0"),
    (KDConfig(transfer_max=-1), "kd.transfer_max=-1 >= 0"),
    (KDConfig(alpha=0.5, transfer="t.txt", hidden_weight=1.0), "set kd.hidden_weight=0 or kd.transfer=''"),
    (KDConfig(alpha=0.5, transfer="t.txt", method="mutual"), "kd.augment=0 and kd.transfer=''"),
])
def test_transfer_settings_that_cannot_work_are_refused_in_one_line(kd, match):
    with pytest.raises(EdgestillError, match=match):
        check_kd_config(kd)


def test_augmenting_a_ce_only_student_is_refused(teacher, splits):
    model, tok, _ = teacher
    student, s_tok, table, _ = _student(model, tok, splits)
    with pytest.raises(EdgestillError, match="kd.augment=2.*kd.alpha > 0"):
        distill_classifier(model, student, tok, splits, table, s_tok, TrainConfig(steps=2, max_len=24),
                           KDConfig(alpha=0.0, augment=2))


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_a_killed_training_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(enc_dir, splits, tmp_path,
                                                                                                ema):
    import torch.nn.functional as F

    from edgestill.distill.classifier import train_classifier

    cfg = TrainConfig(steps=12, batch_size=8, lr=3e-3, max_len=24, eval_every=3, ema=ema)
    ce = lambda m, batch, y, idx: (F.cross_entropy(m(**batch).logits, y), {})  # noqa: E731

    def run(folder, loss_fn=ce):
        torch.manual_seed(0)
        model, tok, _ = load_encoder_classifier(str(enc_dir), splits.label_map)
        enc = {k: tokenize(tok, getattr(splits, k).texts, 24) for k in ("train", "val")}
        out = train_classifier(model, enc["train"], splits.ids("train"), enc["val"], splits.ids("val"), cfg, loss_fn,
                               checkpoint_dir=folder)
        return model, out

    whole, whole_out = run(tmp_path / "whole")
    calls = []

    def killed_at_step_8(m, batch, y, idx):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt  # the kill: after the checkpoint of step 6
        return ce(m, batch, y, idx)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", killed_at_step_8)
    assert (tmp_path / "killed" / "LATEST").read_text() == "ckpt-000006"
    resumed, resumed_out = run(tmp_path / "killed")  # torch.manual_seed(0) again: the checkpoint's RNG must win
    assert _same_state(resumed, whole.state_dict())
    assert resumed_out["history"] == whole_out["history"] and resumed_out["best_step"] == whole_out["best_step"]


def test_a_checkpoint_of_another_training_is_refused(enc_dir, splits, tmp_path):
    from edgestill.distill.classifier import train_classifier

    torch.manual_seed(0)
    model, tok, _ = load_encoder_classifier(str(enc_dir), splits.label_map)
    enc = {k: tokenize(tok, getattr(splits, k).texts, 24) for k in ("train", "val")}
    args = (model, enc["train"], splits.ids("train"), enc["val"], splits.ids("val"))
    train_classifier(*args, TrainConfig(steps=4, batch_size=8, max_len=24, eval_every=2), checkpoint_dir=tmp_path)
    with pytest.raises(EdgestillError, match="is of another training"):
        train_classifier(*args, TrainConfig(steps=6, batch_size=8, max_len=24, eval_every=2), checkpoint_dir=tmp_path)
    with pytest.raises(EdgestillError, match="holds no weight average"):  # a weight average it never kept
        train_classifier(*args, TrainConfig(steps=4, batch_size=8, max_len=24, eval_every=2, ema=0.9),
                         checkpoint_dir=tmp_path)


# ---------------------------------------------------------------- train.ema: the weight average is validated and kept


def test_weight_ema_averages_with_a_warm_up_and_lends_its_weights_only_inside_the_block():
    from edgestill.distill.ema import WeightEMA

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0), model.bias.fill_(0.0)
    ema = WeightEMA(model, decay=0.9)
    assert ema.rate(0) == pytest.approx(0.1) and ema.rate(1000) == 0.9  # (1 + n) / (10 + n), capped by the decay
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model, n)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), expected))
    with ema.applied(model):
        assert torch.allclose(model.weight, torch.full((1, 2), expected))
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))  # its own weights back
    with pytest.raises(EdgestillError, match="train.ema=1.0 must be in"):
        WeightEMA(model, 1.0)


def test_with_ema_every_validation_scores_the_average_and_the_kept_state_is_the_average(enc_dir, splits, monkeypatch):
    seen = _rig(monkeypatch, [0.4, 0.9, 0.5])
    cfg = TrainConfig(steps=6, batch_size=8, lr=3e-3, max_len=24, eval_every=2, ema=0.8)
    model, result = _train(enc_dir, splits, cfg)
    assert result["best_step"] == 4 and _same_state(model, seen[1])  # the state validated at step 4 is restored ...
    # ... and it is the average of the plain run's weights after steps 1-4 (validated at every step here; the rigged
    # validation touches neither the weights nor the RNG, so the trajectory is the same), not the weights of step 4
    plain = _rig(monkeypatch, [0.1] * 6)
    _train(enc_dir, splits, TrainConfig(steps=6, batch_size=8, lr=3e-3, max_len=24, eval_every=1))
    torch.manual_seed(0)
    start, _, _ = load_encoder_classifier(str(enc_dir), splits.label_map)  # the weights before step 1, as _train has them
    shadow = {k: v.clone() for k, v in start.state_dict().items() if v.is_floating_point()}
    for n in range(4):
        d = min(0.8, (1 + n) / (10 + n))
        shadow = {k: d * v + (1 - d) * plain[n][k] for k, v in shadow.items()}
    assert all(torch.allclose(seen[1][k], v, atol=1e-6) for k, v in shadow.items())
    assert not _same_state(model, plain[3])
    with pytest.raises(EdgestillError, match="train.ema=1.5"):
        _train(enc_dir, splits, TrainConfig(steps=2, max_len=24, ema=1.5))


# ---------------------------------------------------------------- kd.method=mutual: a teacher copy learns beside the student


def test_mutual_learning_trains_a_copy_of_the_teacher_and_leaves_the_reference_alone(teacher, splits):
    model, tok, _ = teacher
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student, s_tok, table, _ = _student(model, tok, splits)
    kd = KDConfig(alpha=0.7, method="mutual", mutual_teacher_lr=1e-3, mutual_gamma=0.4)
    result = distill_classifier(model, student, tok, splits, table, s_tok,
                                TrainConfig(steps=20, batch_size=16, lr=3e-3, max_len=24, eval_every=10), kd)
    assert _same_state(model, before)  # the fine-tuned teacher stays the reference
    last = result["history"][-1]
    assert {"ce", "kl", "teacher_ce", "teacher_kl", "lambda_ts", "lambda_st"} <= set(last)
    assert 0 < last["lambda_ts"] < 1 and 0 < last["lambda_st"] < kd.mutual_gamma
    mutual = result["teacher_mutual"]
    assert set(mutual["test"]) >= {"accuracy", "macro_f1"} and mutual["lr"] == 1e-3
    assert result["test"]["accuracy"] >= 0.6


def test_a_killed_mutual_run_resumes_the_teacher_copy_too(teacher, splits, tmp_path, monkeypatch):
    """The copy's weights, optimizer and loss EMAs go into the checkpoints: a killed run ends where an uninterrupted
    one does, student and copy alike."""
    from edgestill.distill import classifier as mod

    model, tok, _ = teacher
    cfg = TrainConfig(steps=8, batch_size=8, lr=3e-3, max_len=24, eval_every=3)
    kd = KDConfig(alpha=0.7, method="mutual", mutual_teacher_lr=1e-3)

    def run(folder):
        student, s_tok, table, _ = _student(model, tok, splits)
        torch.manual_seed(0)
        return student, distill_classifier(model, student, tok, splits, table, s_tok, cfg, kd, checkpoint_dir=folder)

    whole, whole_out = run(tmp_path / "whole")
    real, calls = mod.MutualTeacher.step, []

    def killed_at_step_5(self, *a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # after the checkpoint of step 3
        return real(self, *a)

    monkeypatch.setattr(mod.MutualTeacher, "step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.setattr(mod.MutualTeacher, "step", real)
    assert (tmp_path / "killed" / "LATEST").read_text() == "ckpt-000003"
    resumed, resumed_out = run(tmp_path / "killed")
    assert _same_state(resumed, whole.state_dict())
    assert resumed_out["history"] == whole_out["history"]
    assert resumed_out["teacher_mutual"] == whole_out["teacher_mutual"]  # the copy resumed, not restarted


@pytest.mark.parametrize("kd, match", [
    (KDConfig(method="online"), "kd.method 'online': choose offline or mutual"),
    (KDConfig(method="mutual", alpha=0.0), "needs kd.alpha > 0"),
    (KDConfig(method="mutual", augment=2), "set kd.augment=0 and kd.transfer=''"),
    (KDConfig(method="mutual", mutual_gamma=1.5), "gamma=1.5 must be in"),
    (KDConfig(method="mutual", mutual_teacher_lr=0.0), "mutual_teacher_lr=0.0 must be > 0"),
])
def test_mutual_settings_that_cannot_work_are_refused_in_one_line(kd, match):
    with pytest.raises(EdgestillError, match=match):
        check_kd_config(kd)
