"""Several teachers in the distillation loop (MTAKD, `teacher.extra`): a shared top-k support per position,
agreement weights that shun a corrupted teacher, weights logged and plotted, tokenizer checks, resume."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import load_tiny_teacher, tiny_overrides  # tests/ is on sys.path
from edgestill.config import load_config
from edgestill.distill import trainer
from edgestill.distill.multi_teacher import TeacherMixer
from edgestill.distill.teacher_cache import build_union_topk_cache, teachers_union_topk
from edgestill.errors import EdgestillError
from edgestill.jobs.shrink import distill as distill_run

K_TOP = 8


def _perturbed(model, scale: float, seed: int):
    """A copy of `model` with Gaussian noise of `scale` x each matrix's std added to every matrix."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def teachers(tiny_model_dir, tmp_path_factory):
    """(folders, models): a peaked tiny teacher, a faithful copy (1% noise) and a corrupted copy (2x noise).

    The random tiny model predicts almost uniformly; sharpening its final norm gives teachers whose
    disagreement is visible, as with real models.
    """
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("teachers")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    main = load_tiny_teacher(tiny_model_dir)
    with torch.no_grad():
        main.model.norm.weight.mul_(8.0)
    models = {"main": main, "faithful": _perturbed(main, 0.01, 1), "corrupted": _perturbed(main, 2.0, 2)}
    folders = {}
    for name, model in models.items():
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders, models


def _overrides(folders, corpus, out, steps=6, weighting="agreement"):
    return [*tiny_overrides(folders["main"], corpus, out, steps=steps), f"distill.top_k={K_TOP}",
            f"teacher.extra=[{folders['faithful']}, {folders['corrupted']}]", f"distill.teacher_weighting={weighting}"]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_union_support_holds_every_teachers_topk_with_exact_logprobs(teachers):
    _, models = teachers
    ms = list(models.values())
    ids = torch.randint(3, ms[0].config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logprobs, support = teachers_union_topk(ms, ids, K_TOP)
    assert logprobs.shape == (3, 2, 11, 3 * K_TOP) and support.shape == (2, 11, 3 * K_TOP)
    sorted_ids = support.sort(-1).values
    assert (sorted_ids[..., 1:] != sorted_ids[..., :-1]).all(), "support ids are distinct"
    for k, m in enumerate(ms):
        full = F.log_softmax(m(input_ids=ids).logits[:, :-1].float(), -1)  # (2, 11, V)
        torch.testing.assert_close(logprobs[k], full.gather(-1, support))
        own_top = full.topk(K_TOP, -1).indices
        assert (own_top.unsqueeze(-1) == support.unsqueeze(-2)).any(-1).all(), f"teacher {k}'s top-k is in the support"


def test_agreement_shuns_the_corrupted_teacher_and_average_does_not(teachers, tmp_path):
    _, models = teachers
    blocks = np.random.default_rng(0).integers(3, 290, size=(6, 16)).astype(np.int32)
    cache = build_union_topk_cache(list(models.values()), blocks, K_TOP, tmp_path / "cache", "fp", batch_size=4,
                                   show_progress=False)
    logprobs, support = cache.get(np.arange(6))
    assert logprobs.shape == (3, 6, 15, 3 * K_TOP) and logprobs.dtype == torch.float16
    target, weights = TeacherMixer("agreement", 0.1).combine(logprobs)
    mean = weights.mean(dim=(1, 2))
    assert mean[2] < 0.5 / 3 and mean[0] > 1 / 3 and mean[1] > 1 / 3, mean
    torch.testing.assert_close(weights.sum(0), torch.ones(6, 15))
    assert (target.exp().sum(-1) <= 1 + 1e-3).all()  # a distribution on the support, tail = the rest
    _, average = TeacherMixer("average").combine(logprobs)
    assert torch.allclose(average, torch.full_like(average, 1 / 3))
    median, share = TeacherMixer("median").combine(logprobs)  # robust aggregation shuns it too
    assert share.mean(dim=(1, 2))[2] < 0.5 / 3 and (median.exp().sum(-1) <= 1 + 1e-3).all()
    torch.testing.assert_close(share.sum(0), torch.ones(6, 15))


def test_distill_run_logs_and_plots_teacher_weights_and_resumes_exactly(teachers, tiny_corpus, tmp_path, monkeypatch):
    folders, _ = teachers
    cfg = load_config(overrides=_overrides(folders, tiny_corpus, tmp_path / "full"))
    run, ctx = distill_run(cfg)
    log = _log(run.path)
    assert [h["step"] for h in log] == list(range(1, 7))
    for h in log:
        w = h["teacher_weights"]
        assert len(w) == 3 and sum(w) == pytest.approx(1.0, abs=1e-5)
        assert w[2] < 0.5 / 3, w  # the corrupted teacher is trusted far less than 1/K
    assert (run.path / "teacher_weights.png").stat().st_size > 1000
    assert (run.path / "cache" / "teachers_union_topk" / "union_ids.npy").is_file()
    assert not (run.path / "cache" / "teacher_topk").exists()

    # the same run killed after its step-4 checkpoint, then rerun: it resumes and ends on the same weights and log
    save = trainer.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(root, student, optimizer, step, *args):
        save(root, student, optimizer, step, *args)
        if step == 4:
            raise Killed

    cfg2 = load_config(overrides=_overrides(folders, tiny_corpus, tmp_path / "part"))
    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        distill_run(cfg2)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    run2, ctx2 = distill_run(cfg2)
    assert ctx2.resumed
    log2 = _log(run2.path)
    assert [h["teacher_weights"] for h in log2] == [h["teacher_weights"] for h in log]
    assert [h["loss"] for h in log2] == [h["loss"] for h in log]
    a, b = load_file(run.path / "student" / "model.safetensors"), load_file(run2.path / "student" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_average_weighting_logs_equal_weights(teachers, tiny_corpus, tmp_path):
    folders, _ = teachers
    run, _ = distill_run(load_config(overrides=_overrides(folders, tiny_corpus, tmp_path / "avg", steps=2,
                                                          weighting="average")))
    for h in _log(run.path):
        assert h["teacher_weights"] == pytest.approx([1 / 3] * 3)


def test_extra_teacher_with_another_tokenizer_is_refused(teachers, tiny_corpus, tmp_path):
    from transformers import AutoTokenizer

    folders, _ = teachers
    other = tmp_path / "other_tokenizer"
    shutil.copytree(folders["faithful"], other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<not-in-the-teacher>"])
    tokenizer.save_pretrained(other)
    cfg = load_config(overrides=[*tiny_overrides(folders["main"], tiny_corpus, tmp_path / "run"),
                                 f"teacher.extra=[{other}]"])
    with pytest.raises(EdgestillError, match=r"teacher.extra '.*other_tokenizer' has a different tokenizer") as e:
        distill_run(cfg)
    assert "\n" not in str(e.value)


def test_median_weighting_trains_and_logs_each_teachers_share(teachers, tiny_corpus, tmp_path):
    folders, _ = teachers
    run, _ = distill_run(load_config(overrides=_overrides(folders, tiny_corpus, tmp_path / "median", steps=2,
                                                          weighting="median")))
    for h in _log(run.path):
        assert sum(h["teacher_weights"]) == pytest.approx(1.0, abs=1e-5) and h["teacher_weights"][2] < 0.5 / 3


def test_multi_teacher_config_is_checked():
    with pytest.raises(EdgestillError, match="teacher_weighting='majority' is unknown; use agreement, average, median"):
        load_config(overrides=["distill.teacher_weighting=majority"])
    with pytest.raises(EdgestillError, match="needs more than 2 teachers, got 2"):
        load_config(overrides=["distill.teacher_weighting=median", "teacher.extra=[other.gguf]"])
    with pytest.raises(EdgestillError, match="teacher_trim=2 needs more than 4 teachers, got 3"):
        load_config(overrides=["distill.teacher_weighting=trimmed_mean", "distill.teacher_trim=2",
                               "teacher.extra=[a.gguf, b.gguf]"])
    with pytest.raises(EdgestillError, match="agreement_tau"):
        load_config(overrides=["distill.agreement_tau=0"])
    with pytest.raises(EdgestillError, match="repeats a teacher"):
        load_config(overrides=["teacher.extra=[smollm2-135m]"])
    assert load_config().teacher.extra == []


def test_on_policy_with_cached_teachers_is_refused(teachers, tmp_path):
    _, models = teachers
    blocks = np.random.default_rng(0).integers(3, 290, size=(4, 16)).astype(np.int32)
    cache = build_union_topk_cache(list(models.values()), blocks, K_TOP, tmp_path / "c", "fp", show_progress=False)
    source = trainer.MultiTeacher(["a", "b", "c"], K_TOP, cache=cache, model=models["main"])
    cfg = load_config(overrides=["distill.on_policy_fraction=0.5"]).distill
    with pytest.raises(EdgestillError, match="cache_teacher=false"):
        trainer.Methods.from_config(cfg, None, source)


def test_live_teachers_without_a_cache(teachers, tiny_corpus, tmp_path):
    folders, _ = teachers
    run, _ = distill_run(load_config(overrides=[*_overrides(folders, tiny_corpus, tmp_path / "live", steps=2),
                                                "distill.cache_teacher=false"]))
    assert not (run.path / "cache").exists()
    log = _log(run.path)
    assert len(log) == 2 and all(h["teacher_weights"][2] < 0.5 / 3 for h in log)
