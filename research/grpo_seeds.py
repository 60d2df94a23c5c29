"""Does GRPO improve on its start, and how much does the SFT seed move the result? GRPO from one
start model with several seeds, or the whole SFT-then-GRPO recipe over several SFT seeds; each GRPO
model is judged against its own start on the same held-out cases (paired bootstrap CI and McNemar),
with the mean and spread across seeds.

    python -m research.grpo_seeds --start data/models/sft_model/model --seeds 1 2 3 --out data/grpo_seeds
    python -m research.grpo_seeds --sft-from data/models/vision_pretrained_model/model \
        --sft-seeds 42 7 11 --seeds 42 --out data/recipe_seeds

Reads the cohort, splits and images of the default layout (``data/``); trains without MLflow
tracking (nothing is registered); prints one row per run and split, then the summary, and writes
``OUT/seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ecg_r1.constants import N_BOOT
from ecg_r1.evaluation.cases import EVAL_SPLITS, evaluation_cases
from ecg_r1.evaluation.evaluate import align
from ecg_r1.evaluation.paired import compare_paired
from ecg_r1.evaluation.predictions import predict_cases
from ecg_r1.evaluation.report import SPLIT_TITLES
from ecg_r1.training import stages
from ecg_r1.training.runner import RunOptions

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--start", type=Path, help="model folder GRPO starts from")
    start.add_argument(
        "--sft-from",
        type=Path,
        help="model folder SFT starts from (the vision pre-trained model); needs --sft-seeds",
    )
    parser.add_argument("--sft-seeds", type=int, nargs="+", default=[], help="SFT seeds (with --sft-from)")
    parser.add_argument("--profile", default="tiny", help="profile name or YAML path (default tiny)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="GRPO seeds")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="data folder (default data/)")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the trained models and seeds.json"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="GRPO steps (default: the profile's)")
    parser.add_argument("--sft-max-steps", type=int, default=None, help="SFT steps (default: the profile's)")
    parser.add_argument("--n-boot", type=int, default=N_BOOT)
    args = parser.parse_args()

    data = {
        "cohort_dir": args.data / "cohort",
        "splits_path": args.data / "splits" / "splits.parquet",
        "images_dir": args.data / "images",
    }
    if (args.sft_from is None) == bool(args.sft_seeds):
        parser.error("--sft-seeds goes with --sft-from, and --sft-from needs --sft-seeds")
    cases = evaluation_cases(*data.values(), list(EVAL_SPLITS))
    # untracked: nothing is logged or registered in MLflow
    untracked = {"options": RunOptions(tracking=False, resume=False, progress=True), **data}
    rows = []
    for sft_seed in args.sft_seeds or [None]:
        if sft_seed is None:
            start_dir, tag = args.start, ""
        else:
            sft = stages.run_sft(
                args.profile,
                args.sft_from,
                out_dir=args.out / f"sft_seed{sft_seed}",
                seed=sft_seed,
                max_steps=args.sft_max_steps,
                **untracked,
            )
            start_dir, tag = Path(sft.model_dir), f"sft_seed{sft_seed}_"
        start, _ = predict_cases(start_dir, args.profile, cases, batch_size=32, name="start")
        for seed in args.seeds:
            result = stages.run_grpo(
                args.profile,
                start_dir,
                out_dir=args.out / f"{tag}grpo_seed{seed}",
                seed=seed,
                max_steps=args.max_steps,
                **untracked,
            )
            grpo, _ = predict_cases(result.model_dir, args.profile, cases, batch_size=32, name=f"seed {seed}")
            for split in EVAL_SPLITS:
                part = cases.filter(cases["split"] == split)
                y, pred_grpo, _ = align(grpo, part)
                _, pred_start, _ = align(start, part)
                paired = compare_paired(y, pred_grpo, pred_start, n_boot=args.n_boot, seed=seed)
                row = {
                    "sft_seed": sft_seed,
                    "seed": seed,
                    "split": split,
                    "n": paired.n,
                    "grpo": paired.accuracy_a,
                    "start": paired.accuracy_b,
                    "difference": paired.difference.value,
                    "low": paired.difference.low,
                    "high": paired.difference.high,
                    "mcnemar_p_mid": paired.p_mid,
                    "zero_std_groups": result.metrics.get("frac_reward_zero_std"),
                    "grpo_seconds": result.seconds,
                }
                rows.append(row)
                print(
                    f"{'' if sft_seed is None else f'SFT seed {sft_seed}, '}GRPO seed {seed} "
                    f"{SPLIT_TITLES[split]}: n {row['n']}, GRPO {row['grpo']:.3f} vs start "
                    f"{row['start']:.3f}, difference {row['difference']:+.3f} [{row['low']:+.3f}, "
                    f"{row['high']:+.3f}], McNemar mid-p {row['mcnemar_p_mid']:.3g}",
                    flush=True,
                )
    summary = {}
    for split in EVAL_SPLITS:
        runs = [r for r in rows if r["split"] == split]
        diffs = [r["difference"] for r in runs]
        grpo = [r["grpo"] for r in runs]
        summary[split] = {
            "mean_difference": statistics.fmean(diffs),
            "sd_difference": statistics.stdev(diffs) if len(diffs) > 1 else float("nan"),
            "seeds_better_p05": sum(r["difference"] > 0 and r["mcnemar_p_mid"] < 0.05 for r in runs),
            "mean_grpo": statistics.fmean(grpo),
            "sd_grpo": statistics.stdev(grpo) if len(grpo) > 1 else float("nan"),
            "min_grpo": min(grpo),
            "max_grpo": max(grpo),
            "seeds": len(diffs),
        }
        s = summary[split]
        print(
            f"{SPLIT_TITLES[split]}: GRPO {s['mean_grpo']:.3f} (sd {s['sd_grpo']:.3f}, {s['min_grpo']:.3f}-"
            f"{s['max_grpo']:.3f}); GRPO - start {s['mean_difference']:+.3f} (sd {s['sd_difference']:.3f}) "
            f"over {s['seeds']} runs; better with McNemar p < 0.05 in {s['seeds_better_p05']}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
