"""`edgestill devices` and `edgestill plan`: the command-line face of edgestill.plan (cli.py registers them)."""

from __future__ import annotations

import argparse
import json

from edgestill.errors import EdgestillError

PLAN_EPILOG = """\
examples:
  edgestill devices                                   # the shipped profiles
  edgestill devices --show rpi5-8gb                   # every figure with its kind and source
  edgestill devices --show host                       # measure this machine (cached)
  edgestill plan --device rpi4-4gb --ram 400MB --decode 20
  edgestill plan --device my-board.yaml --file-size 60MB --formats q8_0,q5_0,q4_0,q4_k --out plan.json
"""


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise EdgestillError(f"'{text}' is not a comma-separated list of integers (e.g. 30,20,15)") from None


def add_plan_commands(sub) -> None:
    """Register `devices` and `plan` on the CLI's subparsers."""
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
    p.add_argument("--formats", default="q8_0,q5_0,q4_0", help="candidate GGUF formats (default q8_0,q5_0,q4_0)")
    p.add_argument("--depths", help="candidate layer counts, e.g. 30,20,15 (default 100/75/50/33/25%% of the teacher)")
    p.add_argument("--widths", help="candidate FFN sizes, e.g. 1536,1024 (default 100/75/50%%)")
    p.add_argument("--calibration-tokens", type=int, default=256, help="calibration tokens (default 256)")
    p.add_argument("--top", type=int, default=5, help="how many plans to print (default 5)")
    p.add_argument("--out", help="write every feasible plan as JSON here")


def run_plan_command(args) -> int:
    from edgestill.plan.devices import describe_devices, load_device

    if args.command == "devices":
        if not args.show:
            print(describe_devices())
            return 0
        kwargs = {"refresh": args.refresh} if args.show == "host" else {}
        print(load_device(args.show, **kwargs).to_yaml(), end="")
        return 0

    from edgestill.plan.allocate import Budget, parse_bytes, plan_for_teacher
    from edgestill.plan.cost import Workload

    budget = Budget(max_ram_bytes=parse_bytes(args.ram), max_file_bytes=parse_bytes(args.file_size),
                    min_decode_tokens_per_s=args.decode, min_prefill_tokens_per_s=args.prefill)
    device = load_device(args.device)
    workload = Workload(context_tokens=args.context, prompt_tokens=args.prompt)
    formats = tuple(f.strip().lower() for f in args.formats.split(",") if f.strip())
    plans = plan_for_teacher(args.teacher, device, budget, data=args.data, workload=workload,
                             calibration_tokens=args.calibration_tokens, formats=formats,
                             depths=_ints(args.depths), widths=_ints(args.widths))
    print(f"{len(plans)} feasible plans on {device.name}; the best {min(args.top, len(plans))} by predicted KL:")
    for i, p in enumerate(plans[: args.top], 1):
        print(f"{i}. {p.summary()}")
        print(f"   teacher layers {p.layers}; default {p.default_format}; plan {json.dumps(p.quant_plan)}")
    if args.out:
        from edgestill.files import write_text_atomic

        out = write_text_atomic(args.out, json.dumps({"device": device.to_dict(), "budget": budget.to_dict(),
                                                      "teacher": args.teacher, "plans": [p.to_dict() for p in plans]},
                                                     indent=2) + "\n", "writing the plans")
        print(f"wrote {out}")
    return 0
