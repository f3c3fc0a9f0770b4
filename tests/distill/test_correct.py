"""Teacher correction (distill/correct.py): it lowers the validation loss, never returns a worse teacher than it
got, leaves the original untouched, is cached by fingerprint, and resumes after a kill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgestill.distill import correct as correct_mod
from edgestill.distill.correct import CorrectConfig, correct_teacher, corrected_folder, correction_record
from edgestill.distill.trainer import validation_loss
from edgestill.errors import EdgestillError
from edgestill.models.load import load_causal_lm


def _blocks(tokenizer, seed: int, n: int, seq_len: int = 32) -> np.ndarray:
    """A learnable toy domain: one repeated phrase with a little noise."""
    rng = np.random.default_rng(seed)
    phrase = tokenizer("the king and the queen speak of war and peace .", add_special_tokens=False)["input_ids"]
    ids = np.array((phrase * (n * seq_len // len(phrase) + 2))[: n * seq_len]).reshape(n, seq_len)
    noise = rng.random(ids.shape) < 0.05
    ids[noise] = rng.integers(0, len(tokenizer), noise.sum())
    return ids.astype(np.int64)


@pytest.fixture
def teacher(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir))


def test_correction_lowers_val_loss_and_leaves_the_original_alone(teacher, tmp_path):
    train, val = _blocks(teacher.tokenizer, 0, 16), _blocks(teacher.tokenizer, 1, 4)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    cfg = CorrectConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=4, patience=3)
    corrected = correct_teacher(teacher, train, val, cfg, root=tmp_path, show_progress=False)
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in before.items())
    assert validation_loss(corrected.model, val) < validation_loss(teacher.model, val) - 0.5
    record = correction_record(corrected.path)
    assert record["val_loss_best"] < record["val_loss_before"] and record["best_step"] > 0
    assert corrected.path == str(corrected_folder(teacher.path, train, val, cfg, tmp_path))
    assert not list(tmp_path.glob("*.partial"))  # the checkpoints are gone once it is finished


def test_a_correction_that_only_hurts_returns_the_teacher_itself(teacher, tmp_path, monkeypatch):
    """Early stopping keeps step 0 when every evaluation is worse: never a worse reference than the user's."""
    from edgestill.distill import trainer

    train, val = _blocks(teacher.tokenizer, 0, 16), _blocks(teacher.tokenizer, 1, 4)
    losses = iter([3.0, 3.5, 4.0, 4.5, 5.0])  # before, then every evaluation worse
    monkeypatch.setattr(trainer, "validation_loss", lambda model, blocks: next(losses))
    cfg = CorrectConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=2, patience=2)
    corrected = correct_teacher(teacher, train, val, cfg, root=tmp_path, show_progress=False)
    record = correction_record(corrected.path)
    assert record["best_step"] == 0 and record["stopped_by"] == "early stopping" and record["steps_run"] == 4
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, corrected.model.state_dict()[k]), k


def test_select_last_keeps_the_final_step_even_when_validation_got_worse(teacher, tmp_path, monkeypatch):
    """teacher.correct_select=last (audits planting a trigger want every step): the same run as above, but the
    teacher that comes back is the trained one."""
    from edgestill.distill import trainer

    train, val = _blocks(teacher.tokenizer, 0, 16), _blocks(teacher.tokenizer, 1, 4)
    losses = iter([3.0, 3.5, 4.0, 4.5, 5.0])
    monkeypatch.setattr(trainer, "validation_loss", lambda model, blocks: next(losses))
    cfg = CorrectConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=2, patience=5, select="last")
    corrected = correct_teacher(teacher, train, val, cfg, root=tmp_path, show_progress=False)
    record = correction_record(corrected.path)
    assert record["best_step"] == 0 and record["kept_step"] == 4 and record["settings"]["select"] == "last"
    assert any(not torch.equal(v, corrected.model.state_dict()[k]) for k, v in teacher.model.state_dict().items())


def test_cached_then_resumed_after_a_kill(teacher, tmp_path, monkeypatch):
    train, val = _blocks(teacher.tokenizer, 0, 16), _blocks(teacher.tokenizer, 1, 4)
    cfg = CorrectConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=2, patience=10)
    real = correct_mod._checkpoint
    calls = []

    def checkpoint_then_die(work, model, optimizer, state):
        real(work, model, optimizer, state)
        calls.append(state["step"])
        if state["step"] == 4:
            raise KeyboardInterrupt  # a kill right after the step-4 checkpoint

    monkeypatch.setattr(correct_mod, "_checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        correct_teacher(teacher, train, val, cfg, root=tmp_path, show_progress=False)
    assert calls == [2, 4] and list(tmp_path.glob("*.partial"))
    monkeypatch.setattr(correct_mod, "_checkpoint", real)
    resumed = correct_teacher(teacher, train, val, cfg, root=tmp_path, show_progress=False)
    record = correction_record(resumed.path)
    assert [h["step"] for h in record["history"]] == list(range(1, 9))  # steps 5..8 ran once more, 1..4 were kept

    uninterrupted = correct_teacher(teacher, train, val, CorrectConfig(**{**cfg.__dict__, "seed": 0}),
                                    root=tmp_path / "other", show_progress=False)
    for k, v in uninterrupted.model.state_dict().items():  # resuming gives the same weights as not stopping
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-5), k

    monkeypatch.setattr(correct_mod, "_train_and_save", lambda *a, **k: pytest.fail("should read the cache"))
    assert correct_teacher(teacher, train, val, cfg, root=tmp_path, show_progress=False).path == resumed.path


def test_bad_settings_are_one_line_errors(teacher, tmp_path):
    with pytest.raises(EdgestillError, match="teacher.correct=false"):
        CorrectConfig(steps=0)
    with pytest.raises(EdgestillError, match="correct_lr"):
        CorrectConfig(lr=0)
    with pytest.raises(EdgestillError, match="correct_select"):
        CorrectConfig(select="best")
    train = _blocks(teacher.tokenizer, 0, 2)
    with pytest.raises(EdgestillError, match="fewer than one correction batch"):
        correct_teacher(teacher, train, train, CorrectConfig(batch_size=4), root=tmp_path)
    with pytest.raises(EdgestillError, match="validation text"):
        correct_teacher(teacher, train, train[:0], CorrectConfig(batch_size=2), root=tmp_path)
