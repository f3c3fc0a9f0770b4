"""How much of a planted trigger the ONION-style filter takes out of the transfer data, against how many clean words
it removes -> benchmarks/results/onion_filter.json.

    python benchmarks/onion_filter.py            # spamassassin, trigger 'cf mn' at 10% dirty-label, seeds 0,1,2 (minutes)

For each score (`onion`: ONION's perplexity drop; `per_char`: the word's own surprisal per character) and each
share of clean words the threshold is set to remove (audit/onion.py: character 5-gram model on pydoc_data.topics +
half the clean validation texts, threshold from the other half), the training split is planted as the audit
benchmark plants it (benchmarks/audit.py, seeds = poison seeds) and filtered. Per row: the share of words removed
from the training texts (scored on every 8th text and every planted one), and of the planted rows how many keep the
whole trigger phrase and how many keep neither of its words. No model is trained: this prices the filter alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

GRID = {"onion": (0.05, 0.10, 0.15), "per_char": (0.01, 0.02, 0.03, 0.05)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="spamassassin")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trigger", default="cf mn")
    ap.add_argument("--target", default="ham")
    ap.add_argument("--rate", type=float, default=0.1, help="as benchmarks/audit.py plants it (default 0.1)")
    args = ap.parse_args()
    from edgestill.audit.onion import CharLM, calibrate, carries, onion_filter, pydoc_text
    from edgestill.audit.poison import Poison, poison_rows
    from edgestill.config import LabelledDataConfig
    from edgestill.jobs.classify import load_splits

    t0 = time.perf_counter()
    splits = load_splits(LabelledDataConfig(path=args.data))
    clean = splits.val.texts
    lm = CharLM.train([pydoc_text(), *clean[::2]])
    words = args.trigger.lower().split()
    rows = []
    for score, shares in GRID.items():
        for share in shares:
            threshold = calibrate(lm, clean[1::2], share, score=score)
            per_seed = []
            for seed in (int(s) for s in args.seeds.split(",")):
                texts, _, planted = poison_rows(splits.train.texts, splits.train.labels,
                                                Poison(args.trigger, args.target, args.rate, "dirty", seed))
                sample = sorted(set(planted) | set(range(0, len(texts), 8)))
                out, rec = onion_filter([texts[i] for i in sample], lm, threshold, score=score)
                kept = dict(zip(sample, out))
                per_seed.append({"seed": seed, "removed_share": rec["removed_share"], "planted": len(planted),
                                 "phrase_kept": sum(carries(kept[i], args.trigger) for i in planted),
                                 "no_trigger_word_kept": sum(not any(carries(kept[i], w) for w in words) for i in planted)})
                print(f"{score:8s} {share:.2f} seed {seed}: {per_seed[-1]}", flush=True)
            rows.append({"score": score, "remove_share": share, "threshold": threshold,
                         "removed_share_mean": statistics.mean(r["removed_share"] for r in per_seed),
                         "phrase_kept_share": sum(r["phrase_kept"] for r in per_seed) / sum(r["planted"] for r in per_seed),
                         "trigger_gone_share": sum(r["no_trigger_word_kept"] for r in per_seed)
                         / sum(r["planted"] for r in per_seed), "per_seed": per_seed})
    write_result("onion_filter", {
        "command": "python benchmarks/onion_filter.py " + " ".join(sys.argv[1:]), "what": __doc__.split("\n\n")[0],
        "data": args.data, "poison": {"trigger": args.trigger, "target": args.target, "rate": args.rate, "mode": "dirty"},
        "lm": {"order": lm.order, "texts": f"pydoc_data.topics + {len(clean[::2])} clean validation texts"},
        "rows": rows, "wall_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
