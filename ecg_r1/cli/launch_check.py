"""``ecg-r1 launch-check``: check a multi-GPU launch config against a profile before launching."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ecg_r1.modeling.profiles import DEFAULT_PROFILE, TRAINER_KINDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch-check",
        help="check an accelerate launch config (ddp, zero2, zero3) against a profile; no GPU needed",
        description="Read an accelerate config with accelerate's own classes, fill its DeepSpeed JSON's "
        '"auto" values as the trainer will, and plan the per-device batch and accumulation steps that keep '
        "the profile's global batch on N processes (GRPO: whole groups of num_generations completions). "
        "Prints the plan as JSON; exits 2 with the reason when the launch would fail.",
    )
    parser.add_argument("launch_config", metavar="CONFIG", help="ddp, zero2, zero3 or a YAML path")
    parser.add_argument(
        "--profile", default=DEFAULT_PROFILE, help=f"profile name or YAML path (default {DEFAULT_PROFILE})"
    )
    parser.add_argument(
        "--stage", choices=TRAINER_KINDS, default="grpo", help="trainer section (default grpo)"
    )
    parser.add_argument(
        "--num-processes", type=int, metavar="N", help="processes (GPUs) training (default: the config's)"
    )
    parser.add_argument(
        "--vllm-server",
        action="store_true",
        help="check GRPO with use_vllm and vllm_mode server (the profile's other settings unchanged)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ecg_r1.modeling.profiles import load_profile
    from ecg_r1.training.launch import preflight

    profile = load_profile(args.profile)
    if args.vllm_server:
        profile = replace(profile, use_vllm=True, vllm_mode="server")
    plan = preflight(profile, args.stage, args.launch_config, num_processes=args.num_processes)
    print(
        json.dumps({"profile": profile.name, "launch_config": args.launch_config, **asdict(plan)}, indent=2)
    )
    return 0
