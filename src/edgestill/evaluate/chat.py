"""Does the student still follow instructions? A fixed set of chat prompts, teacher vs student.

Students are distilled on plain text, so an instruct teacher's chat behaviour can fade. For each prompt in
`CHAT_PROMPTS` (rendered with the tokenizer's chat template) the reference (teacher) answers greedily, the
student answers greedily, and the student is then scored on the reference's answer by teacher forcing:

- student_answer_nll = mean per-token NLL (nats) of the reference's answer under the student
- reference_answer_nll = the same under the reference itself (the floor the student is measured against)
- answer_top1 = share of answer tokens where the student's argmax is the reference's token

The scored answer includes the end-of-turn token when the reference emitted one (knowing when to stop is part
of following an instruction). A tokenizer without a chat template means the teacher is not an instruct model:
`chat_compare` then returns None, and the caller says "not an instruct model: no chat comparison".
"""

from __future__ import annotations

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
def chat_compare(reference, student, tokenizer, prompts=CHAT_PROMPTS, max_new_tokens: int = 48) -> dict | None:
    """Per-prompt answers and scores of `student` against `reference`, and a token-weighted summary.

    Returns None when the tokenizer has no chat template (not an instruct model: nothing to compare).
    Both models must share the tokenizer (a student cut from the teacher does).
    """
    if not has_chat_template(tokenizer):
        return None
    if max_new_tokens < 1:
        raise EdgestillError(f"max_new_tokens={max_new_tokens} must be at least 1")
    reference.eval()
    student.eval()
    device = next(reference.parameters()).device
    stop_ids = stop_token_ids(tokenizer)
    rows = []
    bar = progress_bar(total=len(prompts), desc="chat comparison (teacher+student)", unit="prompt")
    for prompt in prompts:
        ids = chat_prompt_ids(tokenizer, prompt).to(device)
        ref_answer = greedy_answer(reference, ids, stop_ids, max_new_tokens)
        student_answer = greedy_answer(student, ids, stop_ids, max_new_tokens)
        target = torch.tensor(ref_answer, device=device)  # (A,)
        ref_logp = answer_log_probs(reference, ids, ref_answer)  # (A, V)
        student_logp = answer_log_probs(student, ids, ref_answer)
        if student_logp.shape[-1] != ref_logp.shape[-1]:
            raise EdgestillError(f"the student's vocabulary ({student_logp.shape[-1]}) differs from the reference's "
                                 f"({ref_logp.shape[-1]}); compare a student cut from the same teacher")
        rows.append({
            "prompt": prompt,
            "reference_answer": tokenizer.decode(ref_answer, skip_special_tokens=True).strip(),
            "student_answer": tokenizer.decode(student_answer, skip_special_tokens=True).strip(),
            "student_answer_nll": float(-student_logp.gather(-1, target[:, None]).mean()),
            "reference_answer_nll": float(-ref_logp.gather(-1, target[:, None]).mean()),
            "answer_top1": float((student_logp.argmax(-1) == target).float().mean()),
            "answer_tokens": len(ref_answer),
        })
        bar.update(1)
    bar.close()
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
            "max_new_tokens": max_new_tokens,
        },
    }


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
