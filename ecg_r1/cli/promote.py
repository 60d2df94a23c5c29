"""``ecg-r1 promote``: judge the new model versions of a logged comparison against their champions,
as the ``model_promotion`` asset does (:func:`ecg_r1.evaluation.registry.promote_challengers`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ecg_r1.cli.predict import add_mlflow_root
from ecg_r1.constants import (
    DEFAULT_SEED,
    N_BOOT,
    PROMOTION_ALPHA,
    PROMOTION_MARGIN,
    PROMOTION_TEST,
    PROMOTION_TESTS,
)
from ecg_r1.modeling.profiles import DEFAULT_PROFILE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "promote",
        help="promote the new model versions of a logged comparison unless they are worse than the champion",
        description="For each registered version of a comparison logged with `ecg-r1 evaluate --log` (or "
        "the model_comparison asset), the version (challenger) becomes its model's 'champion' unless its "
        "cross-hospital accuracy is significantly worse than the current champion's on the same cases "
        "(paired test). The decision and its figures are written on the version and into "
        "EVALUATION/promotion.json.",
    )
    parser.add_argument(
        "--evaluation", type=Path, required=True, metavar="DIR", help="the comparison folder (evaluate --out)"
    )
    parser.add_argument(
        "--candidate",
        action="append",
        default=None,
        metavar="ROW",
        help="comparison row whose version is judged; repeatable (default: every registered row)",
    )
    parser.add_argument("--test", default=PROMOTION_TEST, choices=PROMOTION_TESTS)
    parser.add_argument(
        "--alpha", type=float, default=PROMOTION_ALPHA, help="significance level of the paired test"
    )
    parser.add_argument(
        "--margin", type=float, default=PROMOTION_MARGIN, help="non-inferiority margin (paired_bootstrap)"
    )
    parser.add_argument("--n-boot", type=int, default=N_BOOT, help="paired bootstrap resamples")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="resampling seed")
    add_mlflow_root(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ecg_r1.data.split import TEST_EXTERNAL
    from ecg_r1.evaluation import registry
    from ecg_r1.evaluation.promotion import PromotionRule
    from ecg_r1.tracking import runs as tracking

    registry_file = args.evaluation / registry.REGISTRY_FILE
    if not registry_file.is_file():
        raise SystemExit(
            f"{registry_file} not found: log the comparison first (ecg-r1 evaluate --log --out {args.evaluation})"
        )
    try:
        rule = PromotionRule(
            split=TEST_EXTERNAL,
            test=args.test,
            alpha=args.alpha,
            margin=args.margin,
            n_boot=args.n_boot,
            seed=args.seed,
        )
    except ValueError as exc:
        raise SystemExit(f"invalid promotion rule: {exc}") from exc
    candidates = args.candidate or list(json.loads(registry_file.read_text()))
    tracking.open_store(args.mlflow_root)
    rows = registry.promote_challengers(args.evaluation, candidates, rule, DEFAULT_PROFILE).rows
    for row in rows:
        print(f"{row['model']} v{row['challenger']}: {row['decision']} ({row['reason']})")
    if not rows:
        print("no registered versions to judge")
    return 0
