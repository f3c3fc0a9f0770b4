"""The recovery probe (edgestill.plan.probe): a short KD run per candidate, and the planner's re-ranking by it."""

from __future__ import annotations

import json

import pytest
import torch

from edgestill.errors import EdgestillError
from edgestill.plan.allocate import Budget, Plan, plan
from edgestill.plan.cost import StudentShape, gguf_bytes
from edgestill.plan.probe import RecoveryProbe, probe_batches, recover
from plan_fixtures import calib_batches, tiny2, tiny2_dir, toy_device  # noqa: F401  (fixtures)


def test_a_few_kd_steps_bring_a_sliced_student_closer_to_the_teacher_and_leave_its_embeddings(tiny2, calib_batches):
    from edgestill.models.slice import slice_decoder
    from edgestill.plan.sensitivity import mean_kl, model_logits

    reference = model_logits(tiny2, calib_batches)
    student = slice_decoder(tiny2, [1])
    before = mean_kl(student, calib_batches, reference)
    embedding = student.get_input_embeddings().weight.detach().clone()
    teacher_state = {k: v.clone() for k, v in tiny2.state_dict().items()}
    losses = recover(student, tiny2, calib_batches, RecoveryProbe(steps=12, lr=5e-3, warmup_steps=1))
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert mean_kl(student, calib_batches, reference) < before
    assert torch.equal(student.get_input_embeddings().weight, embedding)  # frozen, as distill.freeze_embeddings
    assert all(torch.equal(v, teacher_state[k]) for k, v in tiny2.state_dict().items())  # the teacher is untouched


def test_the_probe_reranks_the_best_plans_by_their_kl_after_recovery(tiny2, calib_batches, toy_device, monkeypatch):
    from edgestill.plan import probe as probe_module
    from edgestill.plan import sensitivity

    real_kl = sensitivity.mean_kl

    def rigged_recover(student, teacher, batches, probe, columns=None):
        student.probed = True
        return [1.0] * probe.steps

    def rigged_kl(model, batches, reference, columns=None):  # after the probe, the shallower student is the better
        if getattr(model, "probed", False):
            return 0.1 * model.config.num_hidden_layers
        return real_kl(model, batches, reference, columns)

    monkeypatch.setattr(probe_module, "recover", rigged_recover)
    monkeypatch.setattr(sensitivity, "mean_kl", rigged_kl)
    shape = StudentShape.from_config(tiny2.config)
    budget = Budget(max_file_bytes=int(gguf_bytes(shape, {}, "q8_0")["file"]))
    kwargs = dict(formats=("f16", "q8_0", "q4_0"), depths=[2, 1], widths=[128])
    as_cut = plan(tiny2, toy_device, budget, calib_batches, **kwargs)
    assert [p.shape.layers for p in as_cut] == [2, 1] and as_cut[0].recovery is None  # the teacher's depth: KL 0
    probed = plan(tiny2, toy_device, budget, calib_batches, probe=RecoveryProbe(steps=3, top=2),
                  probe_batches=calib_batches, **kwargs)
    assert [p.shape.layers for p in probed] == [1, 2]
    assert [p.recovery["kl"] for p in probed] == [pytest.approx(0.1), pytest.approx(0.2)]
    assert all(p.rank_kl == pytest.approx(p.recovery["kl"] + p.quantization_kl) for p in probed)
    assert all(p.recovery["wall_s"] >= 0 for p in probed)  # what each probe cost, kept with its result
    assert "after a 3-step recovery probe" in probed[0].summary()
    assert Plan.from_dict(json.loads(json.dumps(probed[0].to_dict()))).to_dict() == probed[0].to_dict()
    only_best = plan(tiny2, toy_device, budget, calib_batches, probe=RecoveryProbe(steps=3, top=1),
                     probe_batches=calib_batches, **kwargs)
    assert [p.recovery is not None for p in only_best] == [True, False]  # top=1: the rest keep their order as cut
    # the best plan at each candidate hidden size is probed too, however low it ranks as cut
    cut = plan(tiny2, toy_device, budget, calib_batches, probe=RecoveryProbe(steps=3, top=1),
               probe_batches=calib_batches, hiddens=[64, 32], **kwargs)
    probed_hiddens = sorted(p.shape.hidden for p in cut if p.recovery is not None)
    assert probed_hiddens == [32, 64] and all(p.recovery is None for p in cut[2:])


def test_probe_settings_and_batches():
    with pytest.raises(EdgestillError, match="recovery probe: steps"):
        RecoveryProbe(steps=-1)
    with pytest.raises(EdgestillError, match="top"):
        RecoveryProbe(steps=2, top=0)
    blocks = torch.arange(40).reshape(10, 4).numpy()
    got = probe_batches(blocks, 3, RecoveryProbe(steps=2), batch_size=2)
    assert [b.tolist() for b in got] == [blocks[3:5].tolist(), blocks[5:7].tolist()]  # after the calibration blocks
    assert probe_batches(blocks, 3, RecoveryProbe(steps=0)) == []
    assert len(probe_batches(blocks, 8, RecoveryProbe(steps=5), batch_size=2)) == 1  # a short split: what is left
    with pytest.raises(EdgestillError, match="beyond the calibration"):
        recover(None, None, [], RecoveryProbe(steps=2))
