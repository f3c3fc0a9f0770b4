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

`what_broke(...)` returns the dict that metrics.json keeps (out_of_domain, zero_shot, chat, original_teacher);
`what_broke_tables(metrics)` is the report's "What broke" section; `what_broke_line(metrics)` its console line.
"""

from __future__ import annotations

import math

import numpy as np


def what_broke(original, reference, student, tokenizer, test: np.ndarray, *, source: str | None, seq_len: int,
               max_tokens: int, passages: int, chat: bool, chat_tokens: int, batch_size: int = 8) -> dict:
    """The out-of-domain, zero-shot and chat measurements (models: the original teacher, the reference, the student).

    test: the in-domain held-out blocks (for the original teacher's in-domain perplexity beside the reference's).
    source: the out-of-domain corpus ("general-english" or a .txt file); None measures nothing out of domain.
    `original` may be `reference` itself (no correction): it is then measured once.
    """
    from edgestill.data.general import lambada_passages, out_of_domain_blocks
    from edgestill.evaluate.metrics import compare_lm, token_nll

    corrected = original is not reference
    out: dict = {"reference": "corrected" if corrected else "original"}
    if corrected:
        ppl = math.exp(float(token_nll(original, test, batch_size, desc="in-domain: original teacher").mean()))
        out["original_teacher"] = {"perplexity": ppl}
    if source is None:
        return out
    ood = out_of_domain_blocks(tokenizer, seq_len, max_tokens, source)
    summary = compare_lm(reference, student, ood, batch_size)["summary"]
    out["out_of_domain"] = {
        "source": source, "eval_tokens": summary["eval_tokens"],
        "reference_perplexity": summary["teacher_perplexity"], "student_perplexity": summary["student_perplexity"],
        "retention": summary["retention"], "top1_agreement": summary["top1_agreement"],
        "kl_teacher_student": summary["kl_teacher_student"],
    }
    if corrected:
        ppl = math.exp(float(token_nll(original, ood, batch_size, desc="out-of-domain: original teacher").mean()))
        out["out_of_domain"]["original_teacher_perplexity"] = ppl
        out["out_of_domain"]["retention_vs_original"] = ppl / summary["student_perplexity"]
        out["original_teacher"]["out_of_domain_perplexity"] = ppl
    if passages:
        out["zero_shot"] = _zero_shot(original, reference, student, tokenizer, lambada_passages(passages, source), corrected)
    if chat:
        out["chat"] = _chat(original, reference, student, tokenizer, chat_tokens, corrected)
    return out


def _zero_shot(original, reference, student, tokenizer, items, corrected: bool) -> dict:
    from edgestill.evaluate.zeroshot import lambada

    models = {"original_teacher": original, "reference": reference, "student": student}
    if not corrected:
        del models["original_teacher"]
    scores = {name: lambada(model, tokenizer, items) for name, model in models.items()}
    task = next(iter(scores.values()))
    return {"task": task["task"], "n": task["n"], **{k: {"accuracy": v["accuracy"], "perplexity": v["perplexity"]}
                                                    for k, v in scores.items()}}


def _chat(original, reference, student, tokenizer, max_new_tokens: int, corrected: bool) -> dict | None:
    """Both the reference and the student scored on the original (instruct) teacher's answers."""
    from edgestill.evaluate.chat import chat_compare, has_chat_template

    if not has_chat_template(tokenizer):
        return None
    out = {"student": chat_compare(original, student, tokenizer, max_new_tokens=max_new_tokens)}
    if corrected:
        out["reference"] = chat_compare(original, reference, tokenizer, max_new_tokens=max_new_tokens)
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
