"""Vocabulary trimming on the default teacher and data: how many tokens the domain keeps, what that saves, and what
it costs in tokens outside the domain (models/vocab.py). No training: this measures the tokenizer and the sizes.

    python benchmarks/vocab_trim.py                      # Shakespeare's train split, min counts 1, 2, 5 (a few minutes)
    python benchmarks/vocab_trim.py --min-counts 1,10
-> benchmarks/results/vocab_trim.json

For each `min_count` (a token is kept when the train split uses it at least that often; the tokenizer's byte
symbols and specials, and the parts of the merges that build kept tokens, always stay):
- kept tokens and merges, and the embedding's bytes at F16 and Q8_0 before and after (the tied 576-wide table);
- `identical_lines`: of the train split's lines whose tokens are all kept, how many the trimmed tokenizer encodes
  exactly as the full one (renumbered): the proof that the domain's tokenization does not change;
- `tokens_ratio`: tokens the trimmed tokenizer needs ÷ tokens the full one needs, on the held-out test split (text
  the trim never saw: in domain) and on general English (the out-of-domain text of every run's "what broke");
- `round_trip`: decoding the trimmed encoding gives back what the full tokenizer's round trip gives, on every
  out-of-domain document.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

GGUF_Q8_0_BYTES_PER_WEIGHT = 34 / 32  # a Q8_0 block: 32 int8 + one fp16 scale


def _bar(progress_bar, items: list, desc: str, unit: str):
    with progress_bar(total=len(items), desc=desc, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--min-counts", default="1,2,5")
    ap.add_argument("--ood-documents", type=int, default=300, help="general-English documents scored")
    args = ap.parse_args()

    from edgestill.config import DataConfig
    from edgestill.data.corpus import load_documents, split_documents
    from edgestill.data.general import general_english_documents
    from edgestill.models.load import load_causal_lm
    from edgestill.models.vocab import plan_trim, trim_tokenizer, used_token_counts
    from edgestill.progress import progress_bar

    teacher = load_causal_lm(args.teacher)
    tok, hidden = teacher.tokenizer, teacher.model.config.hidden_size
    data = DataConfig(path=args.data)
    splits = split_documents(load_documents(data.path), data.val_fraction, data.test_fraction, data.split_seed)
    train = [d.text for d in splits.train]
    test = [d.text for d in splits.test]
    ood = general_english_documents()[: args.ood_documents]
    train_ids = [tok(t)["input_ids"] for t in _bar(progress_bar, train, "tokenizing the train split", "doc")]
    counts = used_token_counts(np.concatenate(train_ids), len(tok))
    full_test = sum(len(tok(t)["input_ids"]) for t in test)
    full_ood = [tok(t)["input_ids"] for t in ood]
    lines = [line for t in train for line in t.split("\n") if line.strip()]
    line_ids = [np.asarray(tok(line)["input_ids"]) for line in _bar(progress_bar, lines, "tokenizing train lines", "line")]

    rows = []
    for min_count in (int(x) for x in args.min_counts.split(",")):
        trim = plan_trim(tok, counts, min_count=min_count)
        small = trim_tokenizer(tok, trim)
        table = trim.new_ids()
        identical = candidates = 0
        for line, old in zip(_bar(progress_bar, lines, f"min_count={min_count}: checking train lines", "line"), line_ids):
            if len(old) and (table[old] >= 0).all():
                candidates += 1
                identical += small(line)["input_ids"] == table[old].tolist()
        small_ood = [small(t)["input_ids"] for t in ood]
        round_trip = all(small.decode(s) == tok.decode(f) for s, f in zip(small_ood, full_ood))
        rows.append({
            "min_count": min_count, "kept_tokens": trim.size, "vocab": len(tok), "kept_share": trim.size / len(tok),
            "used_in_train": int((counts >= min_count).sum()), "merges": len(trim.merges),
            "embedding_bytes_f16": {"full": len(tok) * hidden * 2, "trimmed": trim.size * hidden * 2},
            "embedding_bytes_q8_0": {"full": int(len(tok) * hidden * GGUF_Q8_0_BYTES_PER_WEIGHT),
                                     "trimmed": int(trim.size * hidden * GGUF_Q8_0_BYTES_PER_WEIGHT)},
            "params_removed": (len(tok) - trim.size) * hidden,
            "params_removed_share_of_teacher": (len(tok) - trim.size) * hidden / sum(
                p.numel() for p in teacher.model.parameters()),
            "identical_lines": identical, "lines_all_kept": candidates, "lines": len(lines),
            "tokens_ratio": {"test_in_domain": sum(len(small(t)["input_ids"]) for t in test) / full_test,
                             "out_of_domain": sum(map(len, small_ood)) / sum(map(len, full_ood))},
            "round_trip": round_trip,
        })
        r = rows[-1]
        print(f"min_count={min_count}: {trim.size:,} of {len(tok):,} tokens kept; {identical:,}/{candidates:,} lines "
              f"identical; tokens x{r['tokens_ratio']['test_in_domain']:.3f} on the test split, "
              f"x{r['tokens_ratio']['out_of_domain']:.3f} on general English; round trip {round_trip}")
    write_result("vocab_trim", {"command": "python benchmarks/vocab_trim.py " + " ".join(sys.argv[1:]),
                                "teacher": args.teacher, "data": args.data, "train_tokens": int(counts.sum()),
                                "ood_documents": len(ood), "rows": rows})


if __name__ == "__main__":
    main()
