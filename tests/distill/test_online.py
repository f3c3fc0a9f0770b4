"""Online distillation of sequence regressors: the transfer losses, who learns from whom, resume, the stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgestill.distill.online import (
    OnlineKDConfig,
    TrainSchedule,
    feature_loss,
    predict,
    relation_loss,
    response_loss,
    rmse,
    stream_update,
    train,
    transfer_loss,
)
from edgestill.errors import EdgestillError
from edgestill.models.sequence import RULConvStudent, RULTransformer, SeriesStudentConfig, SeriesTeacherConfig

WINDOW = 16
TEACHER = SeriesTeacherConfig(d_model=16, layers=1, heads=2, ffn=32, dropout=0.0)
STUDENT = SeriesStudentConfig(channels=4, kernel=3, hidden=8)


def task(n=384, seed=0):
    """Target: the mean of the window's last 4 readings of sensor 0, squashed to [0, 1]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, WINDOW, 2)).astype(np.float32)
    y = (1 / (1 + np.exp(-x[:, -4:, 0].mean(1) * 2))).astype(np.float32)
    return x, y


def models(seed=0):
    torch.manual_seed(seed)
    return RULTransformer(2, WINDOW, TEACHER), RULConvStudent(2, WINDOW, STUDENT)


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


SCHED = TrainSchedule(epochs=3, batch_size=64, lr=5e-3, teacher_lr=2e-3, patience=5)


def test_losses_vanish_on_agreement_and_train_only_the_student():
    t, s = models()
    x = torch.from_numpy(task(32)[0])
    proj = torch.nn.Linear(s.feature_dim, t.feature_dim)
    t_pred, t_feat = t(x)
    s_pred, s_feat = s(x)
    assert response_loss(t_pred, t_pred).item() == 0
    assert relation_loss(t_feat, t_feat).item() == pytest.approx(0, abs=1e-6)
    assert feature_loss(t_feat, t_feat, torch.nn.Identity()).item() == pytest.approx(0, abs=1e-6)
    loss = transfer_loss(s_pred, s_feat, t_pred, t_feat, proj, OnlineKDConfig())
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in t.parameters())  # the teacher's outputs are targets, never trained through
    assert all(p.grad is not None for p in s.parameters()) and proj.weight.grad is not None


def test_bad_config_is_refused():
    with pytest.raises(EdgestillError, match="kd.method 'distil'"):
        OnlineKDConfig(method="distil")
    with pytest.raises(EdgestillError, match="gamma"):
        OnlineKDConfig(mutual_gamma=1.5)
    x, y = task(64)
    t, s = models()
    with pytest.raises(EdgestillError, match="needs both a teacher and a student"):
        train(s, None, x, y, x, y, OnlineKDConfig(method="online"), SCHED)
    with pytest.raises(EdgestillError, match="exactly one model"):
        train(s, t, x, y, x, y, OnlineKDConfig(method="alone"), SCHED)
    with pytest.raises(EdgestillError, match="train.lr_schedule 'step'"):
        train(s, None, x, y, x, y, OnlineKDConfig(method="alone"), TrainSchedule(lr_schedule="step"))
    with pytest.raises(EdgestillError, match="student.pool 'max'"):
        SeriesStudentConfig(pool="max")


def test_cosine_schedule_decays_per_epoch_and_constant_does_not():
    cosine, constant = TrainSchedule(epochs=4), TrainSchedule(epochs=4, lr_schedule="constant")
    assert [round(cosine.lr_factor(e), 4) for e in range(4)] == [1.0, 0.8536, 0.5, 0.1464]
    assert all(constant.lr_factor(e) == 1.0 for e in range(4))


def test_trend_pooling_adds_one_weight_per_position_and_the_head_inputs_it_feeds():
    mean = RULConvStudent(2, WINDOW, SeriesStudentConfig(channels=4, kernel=3, hidden=8, pool="mean"))
    trend = RULConvStudent(2, WINDOW, SeriesStudentConfig(channels=4, kernel=3, hidden=8, pool="trend"))
    positions = WINDOW - RULConvStudent.receptive_field(STUDENT) + 1
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(trend) - count(mean) == positions + 8 * 8  # the trend weights, and 8 more head inputs x 8 hidden
    pred, feat = trend(torch.from_numpy(task(5)[0]))
    assert pred.shape == (5,) and feat.shape == (5, 8)
    with pytest.raises(ValueError, match="shorter than the student's receptive field"):
        RULConvStudent(2, 4, STUDENT)


def test_training_alone_learns_the_task():
    x, y = task()
    vx, vy = task(128, seed=1)
    _, s = models()
    before = rmse(predict(s, vx), vy)
    out = train(s, None, x, y, vx, vy, OnlineKDConfig(method="alone"), TrainSchedule(epochs=8, batch_size=32, lr=1e-2))
    after = rmse(predict(s, vx), vy)
    assert after < 0.7 * before
    assert out["best"]["student"]["val_rmse"] == pytest.approx(after, rel=1e-5)  # left in its best state


def test_online_teacher_trains_as_if_alone_but_mutual_listens_to_the_student():
    x, y = task()
    vx, vy = task(64, seed=1)
    alone_t, _ = models()
    train(None, alone_t, x, y, vx, vy, OnlineKDConfig(method="alone"), SCHED)
    online_t, online_s = models()
    train(online_s, online_t, x, y, vx, vy, OnlineKDConfig(method="online"), SCHED)
    assert torch.allclose(weights(online_t), weights(alone_t), atol=1e-6)
    mutual_t, mutual_s = models()
    out = train(mutual_s, mutual_t, x, y, vx, vy, OnlineKDConfig(method="mutual"), SCHED)
    assert not torch.allclose(weights(mutual_t), weights(alone_t), atol=1e-4)
    assert all(0 < h["lambda_st"] < 0.5 and 0 < h["lambda_ts"] < 1 for h in out["history"])


def test_offline_teacher_stays_frozen():
    x, y = task()
    t, s = models()
    before = weights(t).clone()
    train(s, t, x, y, x[:64], y[:64], OnlineKDConfig(method="offline"), SCHED)
    assert torch.equal(weights(t), before)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    import edgestill.distill.online as online

    x, y = task()
    vx, vy = task(64, seed=1)
    cfg = OnlineKDConfig(method="mutual")
    sched = TrainSchedule(epochs=4, batch_size=64, patience=10)  # cosine: the resumed epochs need the same lr
    t1, s1 = models()
    train(s1, t1, x, y, vx, vy, cfg, sched)
    t2, s2 = models()
    ckpt = tmp_path / "ckpt"
    saves = []
    real_save = online._save

    def killed_after_two(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(online, "_save", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(s2, t2, x, y, vx, vy, cfg, sched, ckpt)
    monkeypatch.setattr(online, "_save", real_save)
    t3, s3 = models(seed=7)  # fresh objects: everything must come from the checkpoint
    out = train(s3, t3, x, y, vx, vy, cfg, sched, ckpt)
    assert [h["epoch"] for h in out["history"]] == [0, 1, 2, 3]
    assert torch.allclose(weights(s3), weights(s1), atol=1e-6) and torch.allclose(weights(t3), weights(t1), atol=1e-6)
    with pytest.raises(EdgestillError, match="holds a 'mutual' run"):
        train(s3, t3, x, y, vx, vy, OnlineKDConfig(method="online"), SCHED, ckpt)


def test_stream_is_prequential_and_moves_the_student_towards_the_teacher():
    x, _ = task(80, seed=3)
    t, s = models()
    frozen = predict(s, x)
    before = rmse(frozen, predict(t, x))
    order = list(range(len(x)))
    preds = stream_update(s, t, x, order, lr=0.05, batch=8)
    assert preds[0] == pytest.approx(frozen[0], abs=1e-6)  # predicted before learning from it
    assert rmse(predict(s, x), predict(t, x)) < before
