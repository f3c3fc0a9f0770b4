"""On-policy distillation: train on sequences the student wrote itself.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes"): with probability lambda a batch is replaced by sequences the student sampled from prompts
(here: the first `prompt_tokens` tokens of the batch's own rows), and the teacher scores them. The
sampling has no gradient (`torch.no_grad()`); the loss is the divergence on the generated positions.
DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models") makes
lambda adaptive, raising it when the validation loss stops improving, and keeps a replay buffer of
generations so that sampling (the expensive part) is amortised over several steps.

Everything is a pure function of (seed, step, rank) plus the buffer, so a run is reproducible:

    batches = OnPolicyBatches(OnPolicyConfig(fraction=0.5, prompt_tokens=16))
    ids, generated = batches.draw(step, ids, student)      # generated: (B, T-1) loss mask or None
    ...
    batches.schedule.update(val_loss)                       # after each evaluation (adaptive=True)

Sequences keep the batch's length (no early stop at EOS) so they stack with real blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from edgestill.errors import EdgestillError
from edgestill.models.cache import decode_step


@dataclass(frozen=True)
class OnPolicyConfig:
    fraction: float = 0.5  # lambda: probability that a batch is replaced by student samples
    adaptive: bool = False  # DistiLLM: raise lambda when validation loss stops improving
    fraction_step: float = 0.1  # how much lambda rises each time
    max_fraction: float = 1.0
    patience: int = 1  # evaluations without improvement before lambda rises
    min_improvement: float = 0.0  # a validation loss must drop by more than this to count as improvement
    prompt_tokens: int = 16  # the first tokens of each row are the prompt; the rest is sampled
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    replay_capacity: int = 64  # sequences kept for reuse (0 = no buffer)
    replay_ratio: float = 0.5  # on an on-policy step, probability of reusing the buffer instead of sampling
    seed: int = 0

    def __post_init__(self):
        for name in ("fraction", "max_fraction", "replay_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise EdgestillError(f"on-policy {name}={getattr(self, name)} must be in [0, 1]")
        if self.prompt_tokens < 1:
            raise EdgestillError(f"on-policy prompt_tokens={self.prompt_tokens} must be at least 1")
        if self.temperature < 0:
            raise EdgestillError(f"on-policy temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.replay_capacity < 0 or self.patience < 1:
            raise EdgestillError("on-policy replay_capacity must be >= 0 and patience >= 1")


class AdaptiveFraction:
    """DistiLLM's schedule: lambda rises by `fraction_step` (up to `max_fraction`) after `patience`
    evaluations without a validation-loss improvement; with adaptive=False it stays put."""

    def __init__(self, cfg: OnPolicyConfig):
        self.cfg = cfg
        self.value = cfg.fraction
        self.best = math.inf
        self.stalled = 0

    def update(self, val_loss: float) -> float:
        if val_loss < self.best - self.cfg.min_improvement:
            self.best, self.stalled = val_loss, 0
        else:
            self.stalled += 1
            if self.cfg.adaptive and self.stalled >= self.cfg.patience:
                self.value = min(self.value + self.cfg.fraction_step, self.cfg.max_fraction)
                self.stalled = 0
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "best": self.best, "stalled": self.stalled}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.best, self.stalled = state["value"], state["best"], state["stalled"]


class ReplayBuffer:
    """A fixed-capacity FIFO of generated sequences (N, T): the oldest are dropped first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: list[torch.Tensor] = []  # one (T,) tensor per sequence

    def __len__(self) -> int:
        return len(self.items)

    def add(self, sequences: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        self.items.extend(s.clone() for s in sequences)
        del self.items[: max(0, len(self.items) - self.capacity)]

    def sample(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """n sequences drawn without replacement (with, if the buffer holds fewer than n)."""
        if not self.items:
            raise EdgestillError("the replay buffer is empty; add generations before sampling from it")
        idx = rng.choice(len(self.items), size=n, replace=len(self.items) < n)
        return torch.stack([self.items[i] for i in idx])

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": torch.stack(self.items) if self.items else None}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.items = [] if state["items"] is None else list(state["items"].clone())


@torch.no_grad()
def sample_sequences(model, prompts: torch.Tensor, length: int, temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue `prompts` (B, P) to `length` tokens by sampling from `model` (a HF causal LM), with a KV cache.

    No gradient; the model's train/eval mode is restored afterwards. temperature 0 is greedy decoding.
    """
    was_training = model.training
    model.eval()
    try:
        seqs = prompts
        out = model(input_ids=prompts, use_cache=True)
        while seqs.shape[1] < length:
            logits = out.logits[:, -1].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(seqs.device)  # (B, 1)
            seqs = torch.cat([seqs, nxt.to(seqs.dtype)], dim=1)
            if seqs.shape[1] < length:
                out = decode_step(model, nxt, out)
        return seqs
    finally:
        model.train(was_training)


class OnPolicyBatches:
    """Decides, per step, whether the batch is the data or the student's own samples (GKD + DistiLLM)."""

    def __init__(self, cfg: OnPolicyConfig):
        self.cfg = cfg
        self.schedule = AdaptiveFraction(cfg)
        self.buffer = ReplayBuffer(cfg.replay_capacity)

    @property
    def fraction(self) -> float:
        return self.schedule.value

    def draw(self, step: int, input_ids: torch.Tensor, student, rank: int = 0):
        """(input_ids, generated_mask): the batch unchanged with mask None, or student sequences of the same
        shape with a (B, T-1) mask of the logit positions that predict generated tokens."""
        b, t = input_ids.shape
        p = self.cfg.prompt_tokens
        if p >= t:
            raise EdgestillError(f"on-policy prompt_tokens={p} leaves nothing to generate in blocks of {t} tokens; "
                                 "lower the prompt length or raise data.seq_len")
        rng = np.random.default_rng([self.cfg.seed, step, rank])
        if rng.random() >= self.fraction:
            return input_ids, None
        if len(self.buffer) >= b and rng.random() < self.cfg.replay_ratio:
            seqs = self.buffer.sample(b, rng)
        else:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            seqs = sample_sequences(student, input_ids[:, :p], t, self.cfg.temperature, gen)
            self.buffer.add(seqs)
        mask = torch.zeros(b, t - 1, dtype=torch.bool)
        mask[:, p - 1:] = True  # logit position i predicts token i + 1; tokens p.. were generated
        return seqs, mask

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.buffer.load_state_dict(state["buffer"])
