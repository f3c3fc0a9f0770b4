"""Fine-pruning a distilled decoder student ([fine-pruning] in docs/references.md), a backdoor defence: remove each
block's least active FFN units on clean text (models/decoder_prune.py), then fine-tune on that clean text with the
plain next-token loss. `fine_prune.*` of `edgestill shrink` (jobs/shrink.py) runs it after the distillation; the
classifier track's version is distill/classifier.fine_prune.

The clean text is the validation split, the one split a planted backdoor never touches (the poison goes into the
training split, docs/audit.md). The step therefore trains on it: its validation numbers after fine-tuning are
on text it saw, and the run's test split stays held out.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from edgestill.errors import EdgestillError
from edgestill.progress import progress_bar

log = logging.getLogger("edgestill")
MAX_EPOCHS = 3  # more passes over the few clean blocks than this and a student learns them by heart


def fine_prune_lm(model, clean: np.ndarray, cfg, seed: int = 0, show_progress: bool = True) -> dict:
    """Fine-pruning in place (cfg: a FinePruneConfig): prune `cfg.fraction` of every block's FFN units by their
    activation on the clean blocks (N, T), then `cfg.steps` AdamW steps of next-token CE on them (seeded batches).
    Returns what changed: units before and after, the validation loss before, after the cut and after fine-tuning."""
    import torch

    from edgestill.distill.trainer import batch_rows, validation_loss
    from edgestill.models.decoder_prune import prune_dormant_decoder_

    if len(clean) == 0:
        raise EdgestillError("fine-pruning needs clean validation blocks; give the corpus more text or raise "
                             "data.val_fraction")
    t0 = time.perf_counter()
    before = validation_loss(model, clean)
    record = prune_dormant_decoder_(model, clean, cfg.fraction)
    record.update(val_loss_before=before, val_loss_after_prune=validation_loss(model, clean), clean_blocks=len(clean))
    log.info("fine-pruning: %d -> %d FFN units per block (val loss %.3f -> %.3f), then %d clean fine-tuning steps",
             record["units_before"], record["units_after"], before, record["val_loss_after_prune"], cfg.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    batch = min(cfg.batch_size, len(clean))
    epochs = cfg.steps * batch / len(clean)
    if epochs > MAX_EPOCHS:
        log.warning("fine-pruning fine-tunes %.0f epochs over %d clean validation blocks: the student may learn them by "
                    "heart and lose its held-out quality (the test scores show it); lower fine_prune.steps or raise "
                    "data.max_val_tokens", epochs, len(clean))
    bar = progress_bar(total=cfg.steps, desc="fine-pruning: clean fine-tuning", unit="step", disable=not show_progress)
    model.train()
    for step in range(cfg.steps):
        ids = torch.from_numpy(clean[batch_rows(step, batch, len(clean), seed)]).long()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
    bar.close()
    model.eval()
    record.update(val_loss_after_fine_tune=validation_loss(model, clean), steps=cfg.steps, lr=cfg.lr,
                  batch_size=batch, epochs=epochs, seconds=time.perf_counter() - t0)
    return record
