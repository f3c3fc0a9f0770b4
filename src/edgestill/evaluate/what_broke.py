"""What broke: the student (and the corrected teacher) measured outside the training domain.

A student distilled on one domain can keep its in-domain scores and lose the rest. Every run measures, for the
original teacher, the reference (the corrected teacher, or the original when teacher.correct=false) and the
student:

- out-of-domain text: perplexity, and the student's retention, top-1 agreement and KL against the reference, on a
  general-English held-out corpus that no training or calibration touches (data/general.py);
- zero-shot task accuracy by log-likelihood, lm-evaluation-harness's method (evaluate/zeroshot.py): LAMBADA-style
  last-word prediction on held-out passages of that corpus;
- for instruct teachers (a chat template): fixed chat prompts answered through the template, scored by how well
  the reference and the student predict the original teacher's answers (evaluate/chat.py).

What depends on the original teacher and the reference alone (the original's perplexities, both zero-shot
scores, the original's chat answers and the reference's scores on them) is the same for every student: it is
measured once and cached (evaluate/measured.py), and `what_broke_reference` in metrics.json says where it came from.

`what_broke(...)` returns the dict that metrics.json keeps (out_of_domain, zero_shot, chat, original_teacher,
what_broke_reference);
`what_broke_tables(metrics)` is the report's "What broke" section; `what_broke_line(metrics)` its console line.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgestill.evaluate.measured import sha256_of

log = logging.getLogger("edgestill")

# What depends on the original teacher and the reference alone (None: not measured in this run).
REFERENCE_SIDE = ("original_perplexity", "original_out_of_domain_perplexity", "zero_shot", "chat")


def what_broke(original, reference, student, tokenizer, test: np.ndarray, *, source: str | None, seq_len: int,
               max_tokens: int, passages: int, chat: bool, chat_tokens: int, batch_size: int = 8,
               paths: tuple | None = None, cache_dir: str | Path | None = None, student_tokenizer=None,
               vocab=None) -> dict:
    """The out-of-domain, zero-shot and chat measurements (models: the original teacher, the reference, the student).

    test: the in-domain held-out blocks (for the original teacher's in-domain perplexity beside the reference's).
    source: the out-of-domain corpus ("general-english" or a .txt file); None measures nothing out of domain.
    `original` may be `reference` itself (no correction): it is then measured once.
    paths: (the original's folder, the reference's folder), what the reference-side cache keys the models by;
      cache_dir: where that cache lives (evaluate/measured.py `measured_root()`). Either None: nothing is cached.
      What depends on the original and the reference alone is then read from the cache when it was measured
      before, and `what_broke_reference` says whether it was and when it was measured.
    student_tokenizer, vocab: a student with a trimmed vocabulary, its own tokenizer and VocabMap (evaluate/metrics.py
      says how it is compared on the teacher's tokens); the zero-shot task is text, scored with the student's own.
    """
    from edgestill.data.general import lambada_passages, out_of_domain_blocks
    from edgestill.evaluate.chat import CHAT_PROMPTS, has_chat_template
    from edgestill.evaluate.metrics import compare_lm

    corrected = original is not reference
    out: dict = {"reference": "corrected" if corrected else "original"}
    if source is None and not corrected:
        return out  # nothing out of domain, no original beside the reference: nothing to measure
    ood = None if source is None else out_of_domain_blocks(tokenizer, seq_len, max_tokens, source)
    items = lambada_passages(passages, source) if source is not None and passages else None
    prompts = list(CHAT_PROMPTS) if source is not None and chat and has_chat_template(tokenizer) else None
    inputs = {"test_sha256": sha256_of(test) if corrected else None, "out_of_domain": source,
              "out_of_domain_sha256": sha256_of(ood), "zero_shot_sha256": sha256_of(items),
              "chat_prompts": prompts, "chat_tokens": chat_tokens if prompts else None, "batch_size": batch_size}
    side, out["what_broke_reference"] = _reference_side(original, reference, tokenizer, test, ood, items, prompts,
                                                        chat_tokens, batch_size, inputs, paths, cache_dir)
    if corrected:
        out["original_teacher"] = {"perplexity": side["original_perplexity"]}
    if source is None:
        return out
    summary = compare_lm(reference, student, ood, batch_size, vocab)["summary"]
    out["out_of_domain"] = {
        "source": source, "eval_tokens": summary["eval_tokens"],
        "reference_perplexity": summary["teacher_perplexity"], "student_perplexity": summary["student_perplexity"],
        "retention": summary["retention"], "top1_agreement": summary["top1_agreement"],
        "kl_teacher_student": summary["kl_teacher_student"],
    }
    if vocab is not None:
        out["out_of_domain"]["vocab_trim"] = summary["vocab_trim"]
    if corrected:
        ppl = side["original_out_of_domain_perplexity"]
        out["out_of_domain"]["original_teacher_perplexity"] = ppl
        out["out_of_domain"]["retention_vs_original"] = ppl / summary["student_perplexity"]
        out["original_teacher"]["out_of_domain_perplexity"] = ppl
    if items is not None:
        out["zero_shot"] = _zero_shot(side["zero_shot"], student, student_tokenizer or tokenizer, items)
    if chat:
        out["chat"] = _chat(side["chat"], student, tokenizer, student_tokenizer, vocab)
    return out


def _reference_side(original, reference, tokenizer, test, ood, items, prompts, chat_tokens: int, batch_size: int,
                    inputs: dict, paths, cache_dir) -> tuple[dict, dict]:
    """(what depends on the original and the reference alone, where it came from): read from the cache under its
    key when measured before, else measured (and cached, when the models have folders and a cache_dir is given)."""
    from edgestill.evaluate.measured import load_measured, measured_key, store_measured

    key = None
    if cache_dir is not None and paths is not None:
        key = measured_key(paths[0], paths[1], original, reference, tokenizer, **inputs)
    if key is not None:
        found = load_measured(Path(cache_dir), key, REFERENCE_SIDE)
        if found is not None:
            log.info("what broke: the original teacher's and the reference's numbers measured %s, read from the "
                     "cache (eval.cache_reference=false measures them again)", found["measured"])
            return found["result"], {"cached": True, "measured": found["measured"], "key": sha256_of(key)[:32]}
    side = _measure_reference_side(original, reference, tokenizer, test, ood, items, prompts, chat_tokens, batch_size)
    if key is None:
        return side, {"cached": False, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"), "key": None}
    stored = store_measured(Path(cache_dir), key, side)
    return side, {"cached": False, "measured": stored["measured"], "key": sha256_of(key)[:32]}


def _measure_reference_side(original, reference, tokenizer, test, ood, items, prompts, chat_tokens: int,
                            batch_size: int) -> dict:
    """The original teacher's perplexities, the zero-shot scores of the original and the reference, the original's
    chat answers and the reference's scores on them: plain numbers and token ids (JSON-able)."""
    from edgestill.evaluate.chat import chat_answers, score_on_answers
    from edgestill.evaluate.metrics import token_nll
    from edgestill.evaluate.zeroshot import lambada

    corrected = original is not reference
    side: dict = dict.fromkeys(REFERENCE_SIDE)
    if corrected:
        side["original_perplexity"] = math.exp(float(token_nll(original, test, batch_size,
                                                               desc="in-domain: original teacher").mean()))
        if ood is not None:
            side["original_out_of_domain_perplexity"] = math.exp(float(token_nll(
                original, ood, batch_size, desc="out-of-domain: original teacher").mean()))
    if items is not None:
        models = {"original_teacher": original, "reference": reference} if corrected else {"reference": reference}
        side["zero_shot"] = {name: lambada(model, tokenizer, items) for name, model in models.items()}
    if prompts:
        answers = chat_answers(original, tokenizer, prompts, max_new_tokens=chat_tokens)
        scores = score_on_answers(reference, tokenizer, answers, desc="chat comparison (reference)") if corrected else None
        side["chat"] = {"answers": answers, "reference_scores": scores}
    return side


def _zero_shot(side: dict, student, tokenizer, items) -> dict:
    from edgestill.evaluate.zeroshot import lambada

    scores = {**side, "student": lambada(student, tokenizer, items)}
    task = next(iter(scores.values()))
    return {"task": task["task"], "n": task["n"], **{k: {"accuracy": v["accuracy"], "perplexity": v["perplexity"]}
                                                    for k, v in scores.items()}}


def _chat(side: dict | None, student, tokenizer, student_tokenizer=None, vocab=None) -> dict | None:
    """Both the reference and the student scored on the original (instruct) teacher's answers (None: the tokenizer
    has no chat template)."""
    from edgestill.evaluate.chat import chat_result, score_on_answers

    if side is None:
        return None
    answers = side["answers"]
    scores = score_on_answers(student, student_tokenizer or tokenizer, answers, vocab=vocab)
    out = {"student": chat_result(answers, scores, tokenizer, student_tokenizer)}
    if side["reference_scores"] is not None:
        out["reference"] = chat_result(answers, side["reference_scores"], tokenizer)
    return out


def _f(x, fmt="{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def what_broke_rows(m: dict) -> list[tuple[str, str, str]]:
    """(measure, in-domain, out-of-domain) rows of the "What broke" table."""
    ood = m.get("out_of_domain") or {}
    orig = m.get("original_teacher") or {}
    ref = "corrected teacher" if m.get("reference") == "corrected" else "teacher"
    rows = []
    if orig:
        rows.append(("perplexity, original teacher", _f(orig.get("perplexity")), _f(ood.get("original_teacher_perplexity"))))
    rows += [
        (f"perplexity, {ref} (reference)", _f(m["teacher"]["perplexity"]), _f(ood.get("reference_perplexity"))),
        ("perplexity, student", _f(m["student"]["perplexity"]), _f(ood.get("student_perplexity"))),
        (f"student retention vs {ref}", _f(m["retention"], "{:.3f}"), _f(ood.get("retention"), "{:.3f}")),
        (f"student top-1 agreement with {ref}", _f(m["top1_agreement"], "{:.3f}"), _f(ood.get("top1_agreement"), "{:.3f}")),
        (f"student KL({ref} ‖ student), nats/token", _f(m["kl_teacher_student"], "{:.3f}"),
         _f(ood.get("kl_teacher_student"), "{:.3f}")),
    ]
    if orig and orig.get("perplexity"):
        rows.append(("student retention vs original teacher", _f(orig["perplexity"] / m["student"]["perplexity"], "{:.3f}"),
                     _f(ood.get("retention_vs_original"), "{:.3f}")))
    return rows


def what_broke_tables(m: dict) -> list[tuple[str, list[str], list[tuple]]]:
    """The "What broke" section as (caption, header, rows) tables, rendered by the report as markdown and HTML."""
    ood = m.get("out_of_domain")
    if not ood:
        return [("Not measured (eval.out_of_domain is null).", [], [])]
    tables = [(f"In-domain: the held-out test split. Out-of-domain: {ood['eval_tokens']:,} tokens of {ood['source']} "
               "text that no training or calibration touched.", ["", "in-domain", "out-of-domain"], what_broke_rows(m))]
    zs = m.get("zero_shot")
    if zs:
        names = [("original_teacher", "original teacher"), ("reference", "reference"), ("student", "student")]
        tables.append((f"Zero-shot {zs['task']} ({zs['n']} held-out passages; correct = the whole last word is the greedy "
                       "continuation, lm-evaluation-harness's LAMBADA method):",
                       ["model", "accuracy", "perplexity of the last word"],
                       [(label, f"{zs[k]['accuracy']:.3f}", f"{zs[k]['perplexity']:.2f}") for k, label in names if k in zs]))
    chat = m.get("chat")
    if chat:
        first = next(iter(chat.values()))["summary"]
        rows = [("original teacher (itself)", f"{first['reference_answer_nll']:.3f}", "1.000")]
        rows += [(label, f"{chat[k]['summary']['student_answer_nll']:.3f}", f"{chat[k]['summary']['answer_top1']:.3f}")
                 for k, label in (("reference", "corrected teacher"), ("student", "student")) if k in chat]
        tables.append((f"Chat prompts through the chat template ({first['n_prompts']}), scored on the original teacher's "
                       "greedy answers: NLL per answer token (lower is closer) and the share of answer tokens that are "
                       "the model's own top-1.", ["model", "NLL of the original teacher's answers", "answer top-1"], rows))
        tables.append(("Side by side (greedy):", ["prompt", "original teacher", "student"],
                       [(p["prompt"], p["reference_answer"], p["student_answer"]) for p in chat["student"]["prompts"]]))
    elif "chat" in m:
        tables.append(("Chat prompts: not an instruct model (its tokenizer has no chat template), not measured.", [], []))
    return tables


def what_broke_line(m: dict) -> str | None:
    """One console line: in-domain against out-of-domain retention, and the zero-shot delta."""
    ood = m.get("out_of_domain")
    if not ood:
        return None
    line = (f"what broke: retention {m['retention']:.3f} in-domain vs {ood['retention']:.3f} out-of-domain "
            f"({ood['source']}; top-1 {ood['top1_agreement']:.3f}, KL {ood['kl_teacher_student']:.3f})")
    zs = m.get("zero_shot")
    if zs:
        line += (f"; zero-shot last-word accuracy {zs['student']['accuracy']:.3f} vs reference "
                 f"{zs['reference']['accuracy']:.3f}")
    return line
