"""The recovery probe: rank the planner's best students by their KL after a short distillation, not as cut.

The planner ranks candidate shapes by the KL each has against the teacher before any training (its structural KL)
plus what quantization adds. That is the order of the students as cut, and recovery can reverse it: at 22.4 MB the
planner's choice (30 layers at hidden 288, the lowest KL as cut) trained to a worse student than 10 uncut layers, and
the two training logs had crossed after 10 of 100 steps (docs/distillation.md, "The recovery probe"). So, for the
`top` best plans and the best plan at each candidate hidden size (one cut family can fill the top `top` alone):

    student  = the teacher sliced and width-cut as the plan says (as the structural KL cuts it)
    for step in 1..steps:   KD on one batch of train-split blocks the calibration does not use
        loss = KL(teacher ‖ student) per token (T = 1; over the kept tokens of a trimmed vocabulary)
        AdamW, linear warm-up, gradient clip 1, embeddings frozen (as distill.freeze_embeddings does)
    recovered KL = mean KL(teacher ‖ student) on the calibration batches

and the probed plans are ranked by recovered KL + quantization KL. The probe is a proxy for the run's own
distillation (that one reads cached top-k teacher logits, trains with quantization in the loop and for longer);
it only orders candidates. Cost: steps × (a teacher forward + a student forward and backward) per probed plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgestill.errors import EdgestillError


@dataclass
class RecoveryProbe:
    steps: int = 0  # KD steps per probed plan; 0: off (plans ranked by their KL as cut)
    top: int = 3  # the best plans by predicted KL that are probed and re-ranked
    lr: float = 5e-4  # distill.lr's default
    warmup_steps: int = 5

    def __post_init__(self):
        if self.steps < 0 or self.top < 1 or self.lr <= 0 or self.warmup_steps < 0:
            raise EdgestillError(f"recovery probe: steps ({self.steps}) must be >= 0, top ({self.top}) >= 1, lr "
                                 f"({self.lr}) > 0 and warmup_steps ({self.warmup_steps}) >= 0")

    @property
    def on(self) -> bool:
        return self.steps > 0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "top": self.top, "lr": self.lr, "warmup_steps": self.warmup_steps}


def _token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) at T = 1."""
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def recover(student, teacher, train_batches: list[torch.Tensor], probe: RecoveryProbe,
            columns: torch.Tensor | None = None) -> list[float]:
    """`probe.steps` KD steps of `student` towards `teacher` on `train_batches` (cycled); returns the loss per step.
    columns: the token ids a trimmed vocabulary keeps (both softmaxes taken over them)."""
    if not train_batches:
        raise EdgestillError("the recovery probe needs training blocks beyond the calibration ones; give more "
                             "training text or set the probe's steps to 0")
    frozen = {id(m.weight) for m in (student.get_input_embeddings(), student.get_output_embeddings()) if m is not None}
    params = [p for p in student.parameters() if id(p) not in frozen]
    for p in student.parameters():
        p.requires_grad_(id(p) not in frozen)
    opt = torch.optim.AdamW(params, lr=probe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, probe.warmup_steps)))
    student.train()
    losses = []
    for step in range(probe.steps):
        ids = train_batches[step % len(train_batches)]
        with torch.no_grad():
            target = teacher(input_ids=ids).logits
        out = student(input_ids=ids).logits
        if columns is not None:
            target, out = target.index_select(-1, columns), out.index_select(-1, columns)
        loss = _token_kl(target, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    student.eval()
    return losses


def probe_batches(train_blocks, calibration_blocks: int, probe: RecoveryProbe, batch_size: int = 4) -> list:
    """Batches of `batch_size` train-split blocks after the first `calibration_blocks` (which the probe scores on),
    enough for `probe.steps` steps (fewer when the split is short: recover() cycles them)."""
    from edgestill.data.corpus import calibration_batches

    rest = train_blocks[calibration_blocks:]
    return calibration_batches(rest, min(len(rest), probe.steps * batch_size), batch_size) if probe.on else []
