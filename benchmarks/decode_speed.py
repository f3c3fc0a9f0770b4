"""Decode and prefill tokens/s in llama.cpp of the lever students, against llama.cpp's Q4_K_M of the corrected teacher
and the teacher file the user started from, alternated inside one run -> benchmarks/results/decode_speed.json.

    python benchmarks/decode_speed.py                       # every finished GGUF row of runs/bench/levers (~10 min)
    python benchmarks/decode_speed.py --types Q4_K_M,Q8_0   # more llama.cpp baselines
    python benchmarks/decode_speed.py --quick               # one short round: a smoke run -> decode_speed_quick.json
    python benchmarks/decode_speed.py --sweep runs/sweep-levers --types Q4_K_M,Q3_K_M --name decode_speed_sweep
        # every point of a finished sweep against the sweep's own llama.cpp files -> decode_speed_sweep.json

The students are the GGUFs that `benchmarks/levers.py` left in its run folders (a float row has no GGUF and is not
timed here). The baselines are llama.cpp's own quantizer applied to the corrected teacher those rows are scored
against (exported in f32, then quantized, as `edgestill sweep` does; kept under runs/bench/decode_speed, named by the
reference's weights) and the user's original teacher file. Every model is loaded once and the rounds time each in
turn (runtime/llamacpp.alternated_speed), so machine load that changes during the run falls on all of them alike;
the medians and their spread are recorded. Run it alone on the machine: the numbers are speeds.

Each row also carries the bytes of its file and, for a student, the quality its own run measured (metrics.json of the
levers row: retention, top-1 and KL against the corrected teacher, out-of-domain retention) and that run's commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402
from levers import ROWS  # noqa: E402

log = logging.getLogger("edgestill")


def baseline_ggufs(types: list[str], folder: Path) -> dict[str, Path]:
    """{name: GGUF} of llama.cpp's quantizer of the corrected teacher at each type, and of the original file."""
    from edgestill.config import load_config
    from edgestill.data.corpus import corpus_blocks
    from edgestill.export.gguf import export_gguf
    from edgestill.jobs.shrink import reference_teacher
    from edgestill.jobs.sweep import reference_key
    from edgestill.models.load import gguf_file, load_causal_lm
    from edgestill.runtime.llamacpp import llamacpp_quantize

    cfg = load_config()
    original = load_causal_lm(cfg.teacher.model)
    teacher_gguf = gguf_file(cfg.teacher.model)
    reference = reference_teacher(cfg, original, corpus_blocks(cfg.data, original.tokenizer))
    tag = hashlib.sha256(reference_key(reference).encode()).hexdigest()[:8]
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"reference-{tag}-f32.gguf"
    out = {}
    for qtype in types:
        path = folder / f"reference-{tag}-{qtype}.gguf"
        if not path.is_file():
            if not source.is_file():
                export_gguf(reference.model, reference.tokenizer, source, "f32", teacher_gguf=teacher_gguf)
            llamacpp_quantize(source, path, qtype)
        out[f"llama.cpp {qtype} of the corrected teacher"] = path
    source.unlink(missing_ok=True)
    if teacher_gguf is not None:
        out[f"original file ({Path(teacher_gguf).name})"] = Path(teacher_gguf)
    return out


def lever_ggufs(root: Path) -> dict[str, tuple[Path, dict]]:
    """{label: (student.gguf, its run's metrics)} of every finished levers row that has a GGUF, in ROWS order."""
    order = list(ROWS)
    found = []
    for run in root.glob("*"):
        row, seed = run.name.split("-seed")[0], run.name.partition("-seed")[1:]  # levers' folders: <row>[-seed<s>]
        if (run / "DONE").is_file() and (run / "student.gguf").is_file():
            rank = order.index(row) if row in ROWS else len(order)
            label = (ROWS[row][0] if row in ROWS else run.name) + "".join(seed)
            found.append((rank, run.name, label, run))
    return {label: (run / "student.gguf", json.loads((run / "metrics.json").read_text()))
            for _, _, label, run in sorted(found)}


def sweep_ggufs(folder: Path) -> dict[str, tuple[Path, dict]]:
    """{point name: (student.gguf, its run's metrics)} of a finished sweep (edgestill sweep), largest first."""
    curve = folder / "shrink_curve.json"
    if not curve.is_file():
        raise SystemExit(f"{curve} does not exist: finish the sweep first (rerun the same edgestill sweep command)")
    out = {}
    for p in sorted(json.loads(curve.read_text())["points"], key=lambda p: -p["bytes"]):
        run = Path(p.get("detail", {}).get("run", ""))
        if p["series"] == "edgestill" and (run / "student.gguf").is_file():
            out[p["name"]] = (run / "student.gguf", json.loads((run / "metrics.json").read_text()))
    return out


def sweep_baselines(folder: Path, types: list[str], teacher_gguf: str | None) -> dict[str, Path]:
    """The sweep's own llama.cpp files of the corrected teacher (baseline/reference-<TYPE>.gguf) and the original."""
    out = {}
    for qtype in types:
        path = folder / "baseline" / f"reference-{qtype}.gguf"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: the sweep scored no llama.cpp {qtype} (its types: "
                             f"{sorted(q.stem.removeprefix('reference-') for q in (folder / 'baseline').glob('*.gguf'))})")
        out[f"llama.cpp {qtype} of the corrected teacher"] = path
    if teacher_gguf:
        out[f"original file ({Path(teacher_gguf).name})"] = Path(teacher_gguf)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K_M", help="llama.cpp quantization types of the corrected teacher (default Q4_K_M)")
    ap.add_argument("--levers-root", default="runs/bench/levers", help="the levers benchmark's run folders")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; --quick: 1)")
    ap.add_argument("--decode-tokens", type=int, default=None, help="decode steps per timing (default 64; --quick: 4)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", default=None,
                    help="time a finished sweep's points (and its own llama.cpp files) instead of the levers rows")
    ap.add_argument("--name", default=None, help="result name (default decode_speed; --quick: decode_speed_quick)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from edgestill.runtime.llamacpp import alternated_speed

    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    if args.sweep:
        from edgestill.config import load_config
        from edgestill.models.load import gguf_file

        students = sweep_ggufs(Path(args.sweep))
        baselines = sweep_baselines(Path(args.sweep), types, gguf_file(load_config().teacher.model))
    else:
        students = lever_ggufs(Path(args.levers_root))
        baselines = baseline_ggufs(types, Path("runs/bench/decode_speed"))
    if not students:
        raise SystemExit(f"no finished student with a GGUF under {args.sweep or args.levers_root}: run python "
                         "benchmarks/levers.py --rows q3_k,combined (or finish the sweep) first")
    repeats = args.repeats or (1 if args.quick else 7)
    decode_tokens = args.decode_tokens or (4 if args.quick else 64)
    paths = {**baselines, **{name: path for name, (path, _) in students.items()}}
    log.info("timing %d GGUFs, %d rounds of %d prompt + %d decode tokens, alternated", len(paths), repeats,
             args.prompt_tokens, decode_tokens)
    speeds = alternated_speed(paths, args.prompt_tokens, decode_tokens, args.threads, repeats, warmup=1)
    anchor = speeds[f"llama.cpp {types[0]} of the corrected teacher"] if types else None
    rows = []
    for name, s in speeds.items():
        row = {"name": name, "kind": "edgestill" if name in students else "baseline", **s}
        if anchor is not None:
            row[f"decode_x_vs_{types[0].lower()}"] = s["decode_tokens_per_s"] / anchor["decode_tokens_per_s"]
            row[f"bytes_x_vs_{types[0].lower()}"] = anchor["file_bytes"] / s["file_bytes"]
        if name in students:
            m = students[name][1]
            row["run"] = {"retention": m["retention"], "top1_agreement": m["top1_agreement"],
                          "kl_teacher_student": m["kl_teacher_student"],
                          "out_of_domain_retention": (m.get("out_of_domain") or {}).get("retention"),
                          "reference": m.get("reference"), "git_commit": m["environment"].get("git_commit")}
        rows.append(row)
    write_result(args.name or ("decode_speed_quick" if args.quick else "decode_speed"), {
        "what": "prefill and decode tokens/s in llama.cpp, every model loaded once and timed in turn inside one run",
        "command": "python benchmarks/decode_speed.py " + " ".join(sys.argv[1:]),
        "prompt_tokens": args.prompt_tokens, "decode_tokens": decode_tokens, "repeats": repeats, "warmup": 1,
        "sweep": args.sweep,  # the sweep folder whose points were timed; None: the levers rows
        "threads": args.threads, "anchor": f"llama.cpp {types[0]} of the corrected teacher" if types else None,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
