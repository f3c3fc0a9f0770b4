"""The method library wired into the distillation loop: the default objective is unchanged bit for bit,
`distill.loss` and the feature / PID / on-policy switches train, and their state survives a resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import tiny_distill_setup  # tests/ is on sys.path

from edgestill.config import DistillConfig, load_config
from edgestill.distill import trainer
from edgestill.distill.features import sliced_layer_map, uniform_layer_map
from edgestill.distill.losses import cross_entropy, forward_kl_topk, kd_objective
from edgestill.distill.teacher_cache import build_topk_cache, teacher_topk
from edgestill.distill.trainer import CachedTeacher, LiveTeacher, Methods, batch_rows, distill, learning_rate
from edgestill.errors import EdgestillError

BASE = DistillConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, top_k=8, checkpoint_every=0, eval_every=2, seed=0)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    return tiny_distill_setup(tiny_model_dir, [0, 3])


def _run(setup, tmp_path, cfg, source=None, name="run", student=None):
    teacher, make_student, blocks, val = setup
    student = student if student is not None else make_student()
    source = source if source is not None else LiveTeacher(teacher, cfg.top_k)
    history = distill(student, source, blocks, cfg, tmp_path / name, val_blocks=val, show_progress=False)
    return student, history


def test_default_objective_is_bit_identical_to_plain_topk_kd(setup, tmp_path):
    """A hand-written loop of the original objective (alpha T^2 forward-KL(top-k) + (1 - alpha) CE) ends on
    exactly the same weights as the trainer."""
    teacher, make_student, blocks, _ = setup
    cfg = dataclasses.replace(BASE, eval_every=0)
    trained, _ = _run(setup, tmp_path, cfg)

    torch.manual_seed(cfg.seed)
    ref = make_student()
    ref.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, cfg)
        ids = torch.from_numpy(blocks[batch_rows(step, cfg.batch_size, len(blocks), cfg.seed)]).long()
        lp, top = teacher_topk(teacher, ids, cfg.top_k)
        ref.train()
        logits = ref(input_ids=ids).logits[:, :-1]
        loss = kd_objective(forward_kl_topk(logits, lp, top, cfg.temperature), cross_entropy(logits, ids[:, 1:]),
                            cfg.alpha, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    for (name, a), b in zip(trained.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("loss", ["reverse_kl", "skew_kl", "jsd", "total_variation"])
def test_each_loss_trains_from_the_cache(setup, tmp_path, loss):
    teacher, make_student, blocks, _ = setup
    cache = build_topk_cache(teacher, blocks, 8, tmp_path / "cache", "t", show_progress=False)
    student = make_student()
    with torch.no_grad():  # move the sliced student away from its teacher, so there is something to distil
        student.lm_head.weight.add_(0.3 * torch.randn(student.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    cfg = dataclasses.replace(BASE, loss=loss, steps=6, lr=3e-3, alpha=1.0, freeze_embeddings=False)
    _, history = _run(setup, tmp_path, cfg, source=CachedTeacher(cache), student=student)
    kds = [h["kd"] for h in history]
    assert all(np.isfinite(kds))
    assert kds[-1] < kds[0], kds


def test_feature_losses_need_the_live_teacher(setup, tmp_path):
    teacher, _, blocks, _ = setup
    cache = build_topk_cache(teacher, blocks, 8, tmp_path / "cache", "t", show_progress=False)
    for field in ("hidden_mse_weight", "attention_relation_weight", "on_policy_fraction"):
        cfg = dataclasses.replace(BASE, **{field: 0.5})
        with pytest.raises(EdgestillError, match="cache_teacher=false"):
            _run(setup, tmp_path, cfg, source=CachedTeacher(cache))
    # a cache that carries its model is fine: the model runs live
    cfg = dataclasses.replace(BASE, hidden_mse_weight=0.5, steps=1)
    _, history = _run(setup, tmp_path, cfg, source=CachedTeacher(cache, model=teacher))
    assert np.isfinite(history[0]["loss"])


def test_hidden_mse_pairs_a_sliced_student_with_the_blocks_it_kept(setup):
    teacher, make_student, _, _ = setup
    cfg = dataclasses.replace(BASE, hidden_mse_weight=0.5)
    n_t = teacher.config.num_hidden_layers
    sliced = Methods.from_config(cfg, make_student(), LiveTeacher(teacher, cfg.top_k), layers=[0, 3])
    assert sliced.hidden_mse.layer_map == sliced_layer_map([0, 3], n_t) == {1: 1, 2: n_t}
    other = Methods.from_config(cfg, make_student(), LiveTeacher(teacher, cfg.top_k))  # not a slice: uniform map
    assert other.hidden_mse.layer_map == uniform_layer_map(2, n_t)


class Killed(Exception):
    pass


def test_features_pid_and_on_policy_train_and_resume_exactly(setup, tmp_path, monkeypatch):
    cfg = dataclasses.replace(BASE, steps=6, hidden_mse_weight=0.5, attention_relation_weight=1.0, relation_heads=4,
                              pid=True, token_focus=1.0, on_policy_fraction=0.5, on_policy_prompt_tokens=6,
                              on_policy_adaptive=True, checkpoint_every=3)
    full, history = _run(setup, tmp_path, cfg, name="full")
    assert all(np.isfinite(h["loss"]) for h in history)
    alphas = [h["alpha"] for h in history]
    assert alphas[0] == cfg.alpha and len(set(alphas)) > 1 and all(0 <= a <= 1 for a in alphas)
    assert all("on_policy_fraction" in h for h in history)
    # the same run stopped after its step-3 checkpoint and resumed ends on the same weights and log
    save = trainer.save_checkpoint

    def save_then_die(root, student, optimizer, step, *args):
        save(root, student, optimizer, step, *args)
        if step == 3:
            raise Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _run(setup, tmp_path, cfg, name="part")
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    resumed, history2 = _run(setup, tmp_path, cfg, name="part")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert [h["loss"] for h in history2] == [h["loss"] for h in history]
    state = torch.load(tmp_path / "part" / "checkpoints" / "ckpt-000006" / "methods.pt", weights_only=True)
    assert state["hidden_mse"] is not None and state["pid"] is not None


def test_on_policy_steps_use_student_samples(setup, tmp_path):
    cfg = dataclasses.replace(BASE, steps=2, on_policy_fraction=1.0, on_policy_prompt_tokens=5)
    teacher, make_student, blocks, val = setup
    calls = []
    student = make_student()
    student.register_forward_hook(lambda m, i, o: calls.append(1))
    distill(student, LiveTeacher(teacher, 8), blocks, cfg, tmp_path / "op", val_blocks=val, show_progress=False)
    # each step: a prefill + (20 - 5 - 1) decoding calls for sampling, then the training forward
    assert len(calls) >= 2 * (1 + 14 + 1)
    log = [json.loads(x) for x in (tmp_path / "op" / "train_log.jsonl").read_text().splitlines()]
    assert [h["on_policy_fraction"] for h in log] == [1.0, 1.0]


def test_recipe_keys_select_methods():
    cfg = load_config(overrides=["distill.loss=jsd", "distill.beta=0.9", "distill.pid=true"])
    methods = Methods.from_config(cfg.distill)
    assert methods.logit.kind == "jsd" and methods.logit.beta == 0.9 and methods.pid is not None and methods.pid.cfg.kp < 0
    with pytest.raises(EdgestillError, match="distill.loss='kl' is unknown"):  # refused before any work starts
        load_config(overrides=["distill.loss=kl"])
    with pytest.raises(EdgestillError, match="did you mean reverse_kl"):
        load_config(overrides=["distill.loss=revers_kl"])


def test_bf16_precision_trains_in_bf16_and_keeps_fp32_weights(setup, tmp_path):
    """distill.precision=bf16 runs the student's matmuls in bfloat16 (so it ends on other weights than fp32, close
    to them), keeps the weights fp32, and its losses stay finite and fall like fp32's."""
    cfg = dataclasses.replace(BASE, eval_every=0, steps=6)
    fp32, h32 = _run(setup, tmp_path, cfg, name="fp32")
    bf16, h16 = _run(setup, tmp_path, dataclasses.replace(cfg, precision="bf16"), name="bf16")
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    diffs = [(a - b).abs().max().item() for a, b in zip(fp32.parameters(), bf16.parameters())]
    assert max(diffs) > 0  # the forward really ran in bf16
    assert all(np.isfinite(h["loss"]) for h in h16) and h16[-1]["loss"] < h16[0]["loss"]
    assert abs(h16[-1]["loss"] - h32[-1]["loss"]) < 0.1 * h32[0]["loss"]


def test_compile_trains_through_torch_compile_to_the_eager_weights(setup, tmp_path, monkeypatch):
    """distill.compile=true sends every training forward through torch.compile (inductor) and ends on the weights the
    eager run ends on (up to fused-kernel rounding); the run's checkpoint holds the plain module's keys."""
    compiled = []

    def spy(module, *args, **kwargs):
        compiled.append(module)
        return real(module, *args, **kwargs)

    real = torch.compile
    monkeypatch.setattr(trainer.torch, "compile", spy)
    cfg = dataclasses.replace(BASE, eval_every=0, steps=3, checkpoint_every=3)
    eager, h_eager = _run(setup, tmp_path, cfg, name="eager")
    assert not compiled
    fused, h_fused = _run(setup, tmp_path, dataclasses.replace(cfg, compile=True), name="compiled")
    assert compiled == [fused]  # once, the student itself
    np.testing.assert_allclose([h["loss"] for h in h_fused], [h["loss"] for h in h_eager], rtol=1e-4)
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    from safetensors import safe_open

    ckpt = next((tmp_path / "compiled" / "checkpoints").rglob("*.safetensors"))
    with safe_open(str(ckpt), "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())


def test_compile_refuses_torchrun(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "dist_setup", lambda: (0, 2))
    with pytest.raises(EdgestillError, match="distill.compile=true is for one process; this run has 2 torchrun"):
        _run(setup, tmp_path, dataclasses.replace(BASE, compile=True))
    assert not (tmp_path / "run").exists()


def test_compile_refuses_what_it_cannot_train():
    with pytest.raises(EdgestillError, match="distill.compile=true cannot train with quant.format=q4_0"):
        load_config(overrides=["distill.compile=true", "quant.format=q4_0"])
    with pytest.raises(EdgestillError, match="distill.compile=true cannot train with distill.attention_relation_weight"):
        load_config(overrides=["distill.compile=true", "distill.attention_relation_weight=1"])
    with pytest.raises(ValueError, match="distill.compile needs the student"):
        Methods.from_config(DistillConfig(compile=True))


def test_bf16_precision_refuses_a_quantization_aware_student():
    with pytest.raises(EdgestillError, match="distill.precision=bf16 cannot train quant.format=q4_0"):
        load_config(overrides=["distill.precision=bf16", "quant.format=q4_0"])
    with pytest.raises(EdgestillError, match="use fp32 or bf16"):
        load_config(overrides=["distill.precision=fp16"])
