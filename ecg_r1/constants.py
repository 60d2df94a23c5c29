"""Defaults shared by the library, the CLI and the Dagster assets: each is defined here once and
imported wherever it is a default (a leaf module: it imports nothing from ``ecg_r1``)."""

from __future__ import annotations

from pathlib import Path

# The repository (or installed tree) this package sits in: where ``data/``, ``mlflow/`` and the
# DVC virtual environment are looked for, and whose git commit is the runs' provenance.
REPO_ROOT = Path(__file__).resolve().parents[1]

# The random state every seeded step starts from unless told otherwise (simulation, split,
# augmentation, baselines, bootstrap, promotion): make run's figures come from it.
DEFAULT_SEED = 0

# Bootstrap resamples behind every 95 % interval and paired test (evaluation, comparison,
# promotion, and their CLI and Dagster settings).
N_BOOT = 2000

# Examples per forward pass when models answer the evaluation cases (comparison, CLI, Dagster):
# 16 ran 1.7x faster than 8 on a CPU.
PREDICTION_BATCH_SIZE = 16

# The promotion rule's defaults (PromotionRule, ecg-r1 promote, the model_promotion asset): a
# challenger is kept out only when McNemar's paired test finds it worse at the 5 % level.
PROMOTION_TESTS = ("mcnemar", "paired_bootstrap")
PROMOTION_TEST = "mcnemar"
PROMOTION_ALPHA = 0.05
PROMOTION_MARGIN = 0.0
