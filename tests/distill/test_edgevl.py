import numpy as np
import pytest
import torch

from edgestill.distill.edgevl import (
    Stage1Config,
    TeacherFitConfig,
    batch_hard_triplet,
    distill_stage,
    embedding_l1,
    pick_views,
    train_teacher,
)
from edgestill.errors import EdgestillError
from edgestill.models.vision import ImageTower, ImageTowerConfig


def test_triplet_is_zero_when_classes_are_apart_and_positive_when_mixed():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.99, 0.1], [0, 1.0], [0.1, 0.99]]), dim=-1)
    assert float(batch_hard_triplet(e, torch.tensor([0, 0, 1, 1]), 0.2)) == 0
    assert float(batch_hard_triplet(e, torch.tensor([0, 1, 0, 1]), 0.2)) > 0.5
    assert float(batch_hard_triplet(e, torch.tensor([0, 1, 2, 3]), 0.2)) == 0  # no positives in the batch
    assert float(embedding_l1(e, e)) == 0


def test_pick_views_mixes_by_share():
    first, second = np.zeros((100, 1, 2, 2), np.float32), np.ones((100, 1, 2, 2), np.float32)
    rng = np.random.default_rng(0)
    idx = np.arange(100)
    assert pick_views(first, second, idx, 0.0, rng).sum() == 0
    assert pick_views(first, second, idx, 1.0, rng).mean() == 1
    assert 0.3 < pick_views(first, second, idx, 0.5, rng).mean() < 0.7


def _blobs(n=240, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.1, (n, 1, 8, 8)).astype(np.float32)
    x[y == 0, 0, ::2, :] += 1.0  # horizontal stripes
    x[y == 1, 0, :, ::2] += 1.0  # vertical stripes
    x[y == 2] += np.indices((8, 8)).sum(0) % 2  # a checkerboard
    return x, y


def test_teacher_aligns_to_prompts_and_students_learn_its_embedding():
    x, y = _blobs()
    text = torch.nn.functional.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1).numpy()
    torch.manual_seed(0)  # the test must not depend on what ran before it
    teacher = ImageTower(1, 16, ImageTowerConfig(widths=[8, 8], convs=1))
    fit = train_teacher(teacher, x[:200], y[:200], x[200:], y[200:], text, TeacherFitConfig(epochs=15, lr=5e-3), 0)
    assert fit["best_val"] < 0.1  # val zero-shot accuracy > 0.9
    with torch.no_grad():
        target = teacher(torch.from_numpy(x)).numpy()
    second = x[:, :, ::-1].copy()  # a "second view": the image flipped upside down

    def run(share, seed, epochs):
        torch.manual_seed(1)
        student = ImageTower(1, 16, ImageTowerConfig(widths=[8], convs=1))
        before = float(embedding_l1(student(torch.from_numpy(second[200:])), torch.from_numpy(target[200:])))
        c = Stage1Config(epochs=epochs, lr=1e-2, second_share=share)
        r = distill_stage(student, x[:200], second[:200], target[:200], (x[200:], second[200:], target[200:]), c, seed, "t")
        return student, r, before

    student, r, before = run(1.0, 0, 40)
    assert r["best_val"] < 0.3 * before  # learns the teacher's embedding of the first view from the second
    _, r2, _ = run(1.0, 0, 40)
    assert r2["best_val"] == r["best_val"]  # seeded


def test_stage_config_checks():
    with pytest.raises(EdgestillError, match="second_share"):
        Stage1Config(second_share=1.5).check()
    with pytest.raises(EdgestillError, match="epochs"):
        TeacherFitConfig(epochs=0).check("teacher_fit")
