"""`edgestill shrink student.low_rank=0.5` end to end on the tiny model: the blocks' matrices become SVD-initialised
factors that store half their dense parameters, the saved student reloads exactly, is physically smaller, exports to
ONNX (two MatMuls per projection) and is refused, with the reason, where a GGUF or a GGUF format is asked for."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import one_line_error, shrunk_run, tiny_overrides  # tests/ is on sys.path

from edgestill.cli import main


def test_factorized_blocks_keep_the_asked_share_and_reproduce_at_full_rank(tiny_model_dir):
    from edgestill.models.load import load_causal_lm
    from edgestill.models.lowrank import LowRankLinear
    from edgestill.models.slice import count_params, decoder_layers, factorize_decoder_

    model = load_causal_lm(str(tiny_model_dir)).model
    blocks = decoder_layers(model)
    dense = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    before = count_params(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    plan = factorize_decoder_(model, 0.5)
    factored = [m for m in blocks.modules() if isinstance(m, LowRankLinear)]
    assert plan["linear"] and len(factored) == len(plan["linear"])
    assert all(r % 8 == 0 for r in plan["linear"].values())
    # the budget: half the blocks' dense matrices, less what rounding ranks down to multiples of 8 gives up
    assert before - 0.6 * dense <= count_params(model) <= before - dense // 2
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # the head is left alone
    with torch.no_grad():
        out = model(ids).logits
    assert not torch.allclose(out, ref, atol=1e-4)  # a real cut, not a copy

    exact = load_causal_lm(str(tiny_model_dir)).model
    from edgestill.models.lowrank import LowRankConfig, factorize_

    names = [n for n, m in exact.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    factorize_(exact, LowRankConfig(ranks={n: min(exact.get_submodule(n).weight.shape) for n in names}))
    with torch.no_grad():
        assert torch.allclose(exact(ids).logits, ref, atol=1e-4)  # full rank: the same model


def test_a_killed_low_rank_run_resumes_to_the_same_factors(tiny_model_dir, tmp_path, monkeypatch):
    """The factors are rebuilt from the same SVD on resume, then the checkpoint's trained values are loaded."""
    from conftest import tiny_distill_setup

    from edgestill.config import DistillConfig
    from edgestill.distill import trainer
    from edgestill.distill.trainer import LiveTeacher, distill
    from edgestill.models.slice import factorize_decoder_

    teacher, make_student, blocks, val = tiny_distill_setup(tiny_model_dir, [0, 3])
    cfg = DistillConfig(steps=6, batch_size=2, lr=1e-2, warmup_steps=1, top_k=8, checkpoint_every=2, eval_every=2)

    def run(name):
        student = make_student()
        factorize_decoder_(student, 0.5)
        distill(student, LiveTeacher(teacher, cfg.top_k), blocks, cfg, tmp_path / name, val_blocks=val,
                show_progress=False, reference=teacher)
        return student

    whole = run("whole")
    real_step = trainer.train_step

    def killed_after_step_4(*args, **kwargs):
        if args[8] == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = run("resumed")
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert any(k.endswith(".U") for k in whole.state_dict())


@pytest.fixture(scope="module")
def lowrank_run(tiny_model_dir, tiny_corpus, tmp_path_factory):
    return shrunk_run(tmp_path_factory, "lowrank", tiny_model_dir, tiny_corpus, "student.low_rank=0.5", steps=4)


def test_the_low_rank_run_saves_a_smaller_student_that_reloads_exactly(lowrank_run, tiny_model_dir, tiny_corpus,
                                                                       tmp_path):
    from edgestill.models.load import load_causal_lm
    from edgestill.models.lowrank import LowRankLinear

    m = json.loads((lowrank_run / "metrics.json").read_text())
    low = m["student"]["low_rank"]
    assert low["keep"] == 0.5 and low["factorized"] == len(low["ranks"]) > 0
    for key in ("retention", "top1_agreement", "kl_teacher_student"):
        assert math.isfinite(m[key]) and math.isfinite(m["out_of_domain"][key]), key
    student = load_causal_lm(str(lowrank_run / "student")).model
    assert sum(isinstance(x, LowRankLinear) for x in student.modules()) == low["factorized"]
    assert m["student"]["params"] == sum(p.numel() for p in {id(p): p for p in student.parameters()}.values())

    # the same slice without the factors: the low-rank student's files are smaller
    dense = tmp_path / "dense"
    assert main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, dense, steps=2)]) == 0
    dense_m = json.loads((dense / "metrics.json").read_text())
    assert m["student"]["params"] < dense_m["student"]["params"]
    assert m["student"]["bytes"] < dense_m["student"]["bytes"]
    # and the evaluation read the saved factors: evaluating again gives the same scores
    again = main(["eval", str(lowrank_run)])
    assert again == 0
    assert json.loads((lowrank_run / "metrics.json").read_text())["kl_teacher_student"] == pytest.approx(
        m["kl_teacher_student"], rel=1e-6)


def test_the_low_rank_student_exports_to_onnx_and_refuses_gguf(lowrank_run, tmp_path, capsys):
    onnx = tmp_path / "onnx" / "model.onnx"
    assert main(["export", str(lowrank_run), "--format", "onnx", "--type", "f32", "--out", str(onnx)]) == 0
    report = json.loads((onnx.parent / "export_report.json").read_text())
    assert report["parity_vs_pytorch"]["top1_agreement"] >= 0.99
    capsys.readouterr()
    rc = main(["export", str(lowrank_run), "--format", "gguf", "--out", str(tmp_path / "s.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "student.low_rank" in err and "--format onnx" in err and err.count("\n") == 1
    assert not (tmp_path / "s.gguf").exists()


@pytest.mark.parametrize("extra, words", [
    (["student.low_rank=1.0"], "strictly between 0 and 1"),
    (["student.low_rank=0.5", "quant.format=q4_0"], "no GGUF"),
])
def test_bad_low_rank_settings_are_refused_before_any_folder(tiny_model_dir, tiny_corpus, tmp_path, capsys, extra, words):
    rc = main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_the_sweep_refuses_a_low_rank_student_before_any_folder(tiny_model_dir, tiny_corpus, tmp_path):
    from edgestill.config import load_config
    from edgestill.jobs.sweep import SweepSettings, sweep

    cfg = load_config(overrides=[*tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "x"), "student.low_rank=0.5"])
    msg = one_line_error(sweep, cfg, SweepSettings(budgets=[0.5]), tmp_path / "sweep")
    assert "student.low_rank" in msg and not (tmp_path / "sweep").exists()
