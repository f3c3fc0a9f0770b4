"""Training budgets (`distill.budget`): how many steps a run gets, from a token count or from wall-clock time.

    distill.budget=2Mtok   -> steps = ceil(2,000,000 / (batch_size * seq_len)), known before the first step
    distill.budget=2h      -> the trainer times its first steps (`probe_steps`, inside the warm-up, so the learning
                              rate they use does not depend on the total) and the held-out evaluation, then:
                                  steps = done + floor(left / (step_s + eval_s / eval_every + ckpt_s / checkpoint_every))
                              where left = budget - what distillation has spent so far - one final evaluation

What a time budget covers is the distillation loop: training steps, its evaluations and checkpoints. Loading
the teacher, correcting it, caching its logits, exporting and the final evaluation come before or after; the run
records each. The resolved step count is written to RUN/budget.json with the measurements it came from, so a
resumed run trains exactly the steps the first attempt chose (a time budget is not re-measured on resume), and
`distill.steps=<steps>` reproduces the run on any machine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from edgestill.errors import EdgestillError

_TIME_UNITS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60,
               "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600}
_TOKEN_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}
_EXAMPLES = "e.g. 2h, 45m, 600s (wall-clock time of the distillation loop) or 2Mtok, 500k tokens (training tokens)"


@dataclass(frozen=True)
class TrainBudget:
    """A training budget: `seconds` of distillation or `tokens` trained on (exactly one is set)."""

    text: str
    seconds: float | None = None
    tokens: int | None = None

    @classmethod
    def parse(cls, text: str | int | float | None) -> TrainBudget | None:
        """'2h' -> 7200 s, '90m', '600s'; '2Mtok', '2M tokens', '500k tokens', '300000 tokens' -> tokens. None, '' -> None."""
        if text is None or (isinstance(text, str) and not text.strip()):
            return None
        raw = str(text).strip()
        number = r"([0-9]*\.?[0-9]+)\s*"
        m = re.fullmatch(number + r"([a-z]*)\s*(?:tok|toks|token|tokens)", raw, re.IGNORECASE)
        if m is not None:  # a token count: 2Mtok, 500k tokens, 300000 tokens
            scale = m.group(2).lower()
            if scale not in _TOKEN_SCALE:
                raise EdgestillError(f"distill.budget='{raw}': '{m.group(2)}' is not a token multiplier (use k, M or G), "
                                     f"{_EXAMPLES}")
            count = int(round(float(m.group(1)) * _TOKEN_SCALE[scale]))
            if count < 1:
                raise EdgestillError(f"distill.budget='{raw}' is no tokens at all; {_EXAMPLES}")
            return cls(raw, tokens=count)
        m = re.fullmatch(number + r"([a-z]*)", raw, re.IGNORECASE)
        if m is None:
            raise EdgestillError(f"distill.budget='{raw}' is not a budget; give a time or a token count, {_EXAMPLES}")
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit not in _TIME_UNITS:
            hint = " (a bare number is ambiguous: say 600s or 600 tokens)" if unit == "" else ""
            raise EdgestillError(f"distill.budget='{raw}': unknown unit '{unit}'{hint}; {_EXAMPLES}")
        seconds = value * _TIME_UNITS[unit]
        if seconds <= 0:
            raise EdgestillError(f"distill.budget='{raw}' is no time at all; {_EXAMPLES}")
        return cls(raw, seconds=seconds)

    def steps_for_tokens(self, tokens_per_step: int) -> int:
        return max(1, math.ceil(self.tokens / tokens_per_step))

    def steps_for_time(self, done: int, spent_s: float, step_s: float, eval_s: float, eval_every: int,
                       ckpt_s: float, checkpoint_every: int, min_steps: int) -> int:
        """Total steps that fit: `done` steps already taken in `spent_s` seconds, then each further step costs
        `step_s` plus its share of the evaluations and checkpoints, and one final evaluation is kept back.

        Fewer than `min_steps` in all (the steps already taken and one more) is refused: the budget is spent."""
        per_step = step_s + (eval_s / eval_every if eval_every else 0.0) + (ckpt_s / checkpoint_every if checkpoint_every else 0.0)
        left = self.seconds - spent_s - eval_s
        total = done + max(0, math.floor(left / per_step))
        if total < min_steps:
            need = spent_s + eval_s + (min_steps - done) * per_step
            raise EdgestillError(
                f"distill.budget={self.text} is spent before training starts: it buys {total} training steps here "
                f"(measured: {step_s:.2f} s per step, {eval_s:.1f} s per evaluation, {spent_s:.0f} s spent timing them); "
                f"give at least {math.ceil(need)}s (far more to train well), or lower distill.batch_size or data.seq_len")
        return total


def probe_steps(warmup_steps: int) -> int:
    """How many steps a time budget is measured on: up to 5, inside the warm-up (whose learning rates do not depend on
    the total, so the run equals one given `distill.steps=<total>`), at least 1. The first step carries one-off costs:
    it is left out of the timing when there are more."""
    return max(1, min(5, warmup_steps))
