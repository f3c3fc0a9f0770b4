"""Does the student still follow instructions? A fixed set of chat prompts, teacher vs student.

Students are distilled on plain text, so an instruct teacher's chat behaviour can fade. For each prompt in
`CHAT_PROMPTS` (rendered with the tokenizer's chat template) the reference (teacher) answers greedily
(`chat_answers`), the student answers greedily, and the student is then scored on the reference's answer by
teacher forcing (`score_on_answers`):

- student_answer_nll = mean per-token NLL (nats) of the reference's answer under the student
- reference_answer_nll = the same under the reference itself (the floor the student is measured against)
- answer_top1 = share of answer tokens where the student's argmax is the reference's token

The scored answer includes the end-of-turn token when the reference emitted one (knowing when to stop is part
of following an instruction). A tokenizer without a chat template means the teacher is not an instruct model:
`chat_compare` then returns None, and the caller says "not an instruct model: no chat comparison".

The reference's answers are plain data (token ids and numbers), so one set serves several students
(`chat_compare(..., answers=...)`) and can be cached (evaluate/measured.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgestill.errors import EdgestillError
from edgestill.models.cache import decode_step
from edgestill.progress import progress_bar

CHAT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Translate 'good morning' into French.",
    "Write one sentence about the sea.",
    "What is 12 plus 7?",
    "Explain what a computer is to a child.",
    "Name three colours of the rainbow.",
    "Why do we need to sleep?",
)

# End-of-turn markers of the common chat templates; a marker counts only if the tokenizer's template uses it.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer carries a chat template (an instruct model's)."""
    return bool(getattr(tokenizer, "chat_template", None))


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: eos and the template's end-of-turn token (e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    template = str(getattr(tokenizer, "chat_template", None) or "")
    for marker in _END_OF_TURN:
        if marker in template:
            token_id = tokenizer.convert_tokens_to_ids(marker)
            if token_id is not None and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
    return sorted(ids)


def chat_prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) ids of one user turn rendered with the chat template, ending where the assistant starts."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    # The template writes its own special tokens (bos included, where it has one): add none twice.
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


@torch.no_grad()
def greedy_answer(model, prompt_ids: torch.Tensor, stop_ids: list[int], max_new_tokens: int) -> list[int]:
    """Argmax decoding with the KV cache, up to and including the first stop token.

    A plain loop rather than `model.generate`, so a model's generation_config (repetition penalty, ...) cannot
    change what "greedy" means.
    """
    out = model(input_ids=prompt_ids, use_cache=True)
    answer: list[int] = []
    for _ in range(max_new_tokens):
        next_id = out.logits[:, -1:].argmax(-1)  # (1, 1)
        answer.append(int(next_id))
        if answer[-1] in stop_ids or len(answer) == max_new_tokens:
            break
        out = decode_step(model, next_id, out)
    return answer


@torch.no_grad()
def answer_log_probs(model, prompt_ids: torch.Tensor, answer: list[int]) -> torch.Tensor:
    """(A, V) log-probabilities the model gives each answer position, the answer fed in (teacher forcing)."""
    ids = torch.cat([prompt_ids, torch.tensor([answer], device=prompt_ids.device)], dim=1)  # (1, T + A)
    logits = model(input_ids=ids).logits[0, prompt_ids.shape[1] - 1 : -1].float()  # (A, V)
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def chat_answers(model, tokenizer, prompts=CHAT_PROMPTS, max_new_tokens: int = 48) -> dict | None:
    """The greedy answers of `model` (the original teacher) to `prompts`, the answers every model is scored on.

    Returns None when the tokenizer has no chat template, else plain data (JSON-able, what evaluate/measured.py
    caches): {"prompts", "answers": token ids per prompt, "answer_nll": the model's own mean NLL of each answer,
    "vocab_size", "max_new_tokens"}.
    """
    if not has_chat_template(tokenizer):
        return None
    if max_new_tokens < 1:
        raise EdgestillError(f"max_new_tokens={max_new_tokens} must be at least 1")
    model.eval()
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer)
    answers, nll, vocab = [], [], None
    bar = progress_bar(total=len(prompts), desc="chat answers (original teacher)", unit="prompt")
    for prompt in prompts:
        ids = chat_prompt_ids(tokenizer, prompt).to(device)
        answer = greedy_answer(model, ids, stop_ids, max_new_tokens)
        logp = answer_log_probs(model, ids, answer)  # (A, V)
        target = torch.tensor(answer, device=device)  # (A,)
        answers.append(answer)
        nll.append(float(-logp.gather(-1, target[:, None]).mean()))
        vocab = logp.shape[-1]
        bar.update(1)
    bar.close()
    return {"prompts": list(prompts), "answers": answers, "answer_nll": nll, "vocab_size": vocab,
            "max_new_tokens": max_new_tokens}


@torch.no_grad()
def score_on_answers(model, tokenizer, answers: dict, desc: str = "chat comparison (student)", vocab=None) -> list[dict]:
    """`model` on the prompts of `answers` (a `chat_answers` result): per prompt its own greedy answer (token ids),
    its mean NLL of the given answer and the share of that answer's tokens that are its own top-1.

    vocab: the model's VocabMap when its vocabulary is trimmed (`tokenizer` is then its own): the answer is fed as its
    pieces, the NLL stays per answer token (summed over its pieces), and a token the model lacks is never its top-1.
    """
    model.eval()
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer)
    scores = []
    bar = progress_bar(total=len(answers["prompts"]), desc=desc, unit="prompt")
    for prompt, given in zip(answers["prompts"], answers["answers"]):
        ids = chat_prompt_ids(tokenizer, prompt).to(device)
        own = greedy_answer(model, ids, stop_ids, answers["max_new_tokens"])
        nll, top1 = (_answer_scores(model, ids, given, answers["vocab_size"]) if vocab is None
                     else _answer_scores_trimmed(model, ids, given, vocab))
        scores.append({"answer": own, "answer_nll": nll, "answer_top1": top1})
        bar.update(1)
    bar.close()
    return scores


def _answer_scores(model, ids: torch.Tensor, given: list[int], vocab_size: int) -> tuple[float, float]:
    """(mean NLL of the answer `given`, share of its tokens that are the model's top-1)."""
    logp = answer_log_probs(model, ids, given)  # (A, V)
    if logp.shape[-1] != vocab_size:
        raise EdgestillError(f"the student's vocabulary ({logp.shape[-1]}) differs from the reference's "
                             f"({vocab_size}); compare a student cut from the same teacher")
    target = torch.tensor(given, device=ids.device)  # (A,)
    return float(-logp.gather(-1, target[:, None]).mean()), float((logp.argmax(-1) == target).float().mean())


def _answer_scores_trimmed(model, ids: torch.Tensor, given: list[int], vocab) -> tuple[float, float]:
    """The same for a trimmed vocabulary: the answer fed as its pieces, NLL per answer token (summed over pieces)."""
    pieces, starts = vocab.expand(given)
    logp = answer_log_probs(model, ids, pieces)  # (pieces, K)
    piece_lp = logp.gather(-1, torch.tensor(pieces, device=ids.device)[:, None]).squeeze(-1).cpu().numpy()
    owner = np.searchsorted(starts, np.arange(len(pieces)), side="right") - 1
    nll = -np.bincount(owner, weights=piece_lp, minlength=len(given))  # per answer token
    wanted = vocab.table[torch.tensor(given)].to(ids.device)  # -1 where the model lacks the token
    top1 = logp[torch.from_numpy(starts).to(ids.device)].argmax(-1) == wanted
    return float(nll.mean()), float(top1.float().mean())


def chat_result(answers: dict, scores: list[dict], tokenizer, student_tokenizer=None) -> dict:
    """The `chat_compare` result of a student's `scores` on the reference's `answers` (answers decoded here;
    `student_tokenizer`: the student's own, when its vocabulary is trimmed)."""
    rows = []
    for prompt, given, nll, score in zip(answers["prompts"], answers["answers"], answers["answer_nll"], scores):
        rows.append({
            "prompt": prompt,
            "reference_answer": tokenizer.decode(given, skip_special_tokens=True).strip(),
            "student_answer": (student_tokenizer or tokenizer).decode(score["answer"], skip_special_tokens=True).strip(),
            "student_answer_nll": score["answer_nll"],
            "reference_answer_nll": nll,
            "answer_top1": score["answer_top1"],
            "answer_tokens": len(given),
        })
    tokens = sum(r["answer_tokens"] for r in rows)

    def weighted(key: str) -> float:
        return sum(r[key] * r["answer_tokens"] for r in rows) / tokens if tokens else float("nan")

    return {
        "prompts": rows,
        "summary": {
            "student_answer_nll": weighted("student_answer_nll"),
            "reference_answer_nll": weighted("reference_answer_nll"),
            "answer_top1": weighted("answer_top1"),
            "answer_tokens": tokens,
            "n_prompts": len(rows),
            "max_new_tokens": answers["max_new_tokens"],
        },
    }


@torch.no_grad()
def chat_compare(reference, student, tokenizer, prompts=CHAT_PROMPTS, max_new_tokens: int = 48,
                 answers: dict | None = None) -> dict | None:
    """Per-prompt answers and scores of `student` against `reference`, and a token-weighted summary.

    Returns None when the tokenizer has no chat template (not an instruct model: nothing to compare).
    Both models must share the tokenizer (a student cut from the teacher does).
    answers: `reference`'s answers already generated (`chat_answers`); they fix the prompts and the answer
      length, and `reference` is then not run at all.
    """
    if not has_chat_template(tokenizer):
        return None
    if answers is None:
        answers = chat_answers(reference, tokenizer, prompts, max_new_tokens)
    return chat_result(answers, score_on_answers(student, tokenizer, answers), tokenizer)


def _cell(text: str) -> str:
    """Text safe inside one markdown table cell: '|' escaped, line breaks as <br>."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def chat_markdown(result: dict) -> str:
    """A side-by-side markdown table of a `chat_compare` result, with its summary line, for the run report."""
    lines = ["| prompt | teacher answer | student answer | student NLL of teacher answer |", "|---|---|---|---:|"]
    for row in result["prompts"]:
        lines.append(f"| {_cell(row['prompt'])} | {_cell(row['reference_answer'])} | {_cell(row['student_answer'])} "
                     f"| {row['student_answer_nll']:.3f} |")
    s = result["summary"]
    lines.append("")
    lines.append(f"Student NLL of the teacher's answers: {s['student_answer_nll']:.3f} nats/token "
                 f"(teacher's own: {s['reference_answer_nll']:.3f}); student top-1 on them: {s['answer_top1']:.1%}; "
                 f"{s['answer_tokens']} answer tokens over {s['n_prompts']} prompts, greedy, "
                 f"at most {s['max_new_tokens']} new tokens.")
    return "\n".join(lines)
