"""Shared defaults have one source (ecg_r1.constants, or the library module that owns them): the
library's signatures, the CLI options and the Dagster configs all read the same value."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from pathlib import Path

from ecg_r1 import constants


def _default(function: Callable, name: str) -> object:
    return inspect.signature(function).parameters[name].default


def _cli_defaults(*argv: str) -> dict[str, object]:
    from ecg_r1.cli import build_parser

    return vars(build_parser().parse_args(list(argv)))


def test_bootstrap_resamples_and_prediction_batch_have_one_value_everywhere() -> None:
    from dagster_project.defs.assets.evaluation_assets import ComparisonConfig, PromotionConfig
    from ecg_r1.evaluation import comparison, evaluate, paired, predictions
    from ecg_r1.evaluation.promotion import PromotionRule
    from ecg_r1.modeling import inference

    evaluate_cli = _cli_defaults(
        "evaluate", "--model", "m", "--cohort", "c", "--splits", "s", "--images", "i", "--out", "o"
    )
    promote_cli = _cli_defaults("promote", "--evaluation", "e")
    n_boots = {
        "evaluate_binary": _default(evaluate.evaluate_binary, "n_boot"),
        "compare_paired": _default(paired.compare_paired, "n_boot"),
        "ComparisonSettings": comparison.ComparisonSettings().n_boot,
        "PromotionRule": PromotionRule().n_boot,
        "ecg-r1 evaluate": evaluate_cli["n_boot"],
        "ecg-r1 promote": promote_cli["n_boot"],
        "ComparisonConfig": ComparisonConfig.model_fields["n_boot"].default,
        "PromotionConfig": PromotionConfig.model_fields["n_boot"].default,
    }
    assert n_boots == dict.fromkeys(n_boots, constants.N_BOOT)
    batches = {
        "predict_cases": _default(predictions.predict_cases, "batch_size"),
        "predict_models": _default(predictions.predict_models, "batch_size"),
        "ComparisonSettings": comparison.ComparisonSettings().batch_size,
        "generate": _default(inference.generate, "batch_size"),
        "generate_and_score": _default(inference.generate_and_score, "batch_size"),
        "answer_probability": _default(inference.answer_probability, "batch_size"),
        "ecg-r1 evaluate": evaluate_cli["batch_size"],
        "ComparisonConfig": ComparisonConfig.model_fields["batch_size"].default,
    }
    assert batches == dict.fromkeys(batches, constants.PREDICTION_BATCH_SIZE)


def test_the_feature_baseline_booster_settings_have_one_source() -> None:
    from dagster_project.defs.assets.evaluation_assets import BaselineConfig
    from ecg_r1.evaluation import baselines

    for name, value in (
        ("max_iter", baselines.BOOST_MAX_ITER),
        ("learning_rate", baselines.BOOST_LEARNING_RATE),
    ):
        assert _default(baselines.boosted_classifier, name) == value
        assert _default(baselines.FeatureBaseline, name) == value
        assert BaselineConfig.model_fields[name].default == value


def test_the_repository_root_has_one_definition() -> None:
    from dagster_project.defs import resources
    from ecg_r1.cli.predict import add_mlflow_root
    from ecg_r1.tracking import versioning
    from ecg_r1.training import launch, runner

    root = Path(__file__).resolve().parents[1]
    assert root == constants.REPO_ROOT
    assert resources.REPO_ROOT is versioning.REPO_ROOT is runner.REPO_ROOT is launch.REPO_ROOT
    assert resources.REPO_ROOT is constants.REPO_ROOT
    parser = argparse.ArgumentParser()
    add_mlflow_root(parser)
    assert parser.parse_args([]).mlflow_root == root


def test_the_promotion_rule_defaults_have_one_source() -> None:
    from dagster_project.defs.assets.evaluation_assets import PromotionConfig
    from ecg_r1.evaluation.promotion import PromotionRule

    rule = PromotionRule()
    promote_cli = _cli_defaults("promote", "--evaluation", "e")
    expected = {
        "test": constants.PROMOTION_TEST,
        "alpha": constants.PROMOTION_ALPHA,
        "margin": constants.PROMOTION_MARGIN,
        "seed": constants.DEFAULT_SEED,
    }
    for name, value in expected.items():
        assert getattr(rule, name) == promote_cli[name] == PromotionConfig.model_fields[name].default == value


def test_every_seed_defaults_to_the_one_default_seed() -> None:
    from dagster_project.defs.assets.data_assets import SimulationConfig, SplitConfig
    from dagster_project.defs.assets.evaluation_assets import BaselineConfig, ComparisonConfig
    from ecg_r1.evaluation import baselines, comparison, evaluate, figures, paired, references
    from ecg_r1.imaging.augment import Augment
    from ecg_r1.simulate import simulate_cohort
    from ecg_r1.training import data

    seeds = {
        "evaluate_binary": _default(evaluate.evaluate_binary, "seed"),
        "compare_paired": _default(paired.compare_paired, "seed"),
        "ComparisonSettings": comparison.ComparisonSettings().seed,
        "boosted_classifier": _default(baselines.boosted_classifier, "seed"),
        "FeatureBaseline": _default(baselines.FeatureBaseline, "seed"),
        "ReferenceBaselines.fit": _default(references.ReferenceBaselines.fit, "seed"),
        "reference_predictions": _default(references.reference_predictions, "seed"),
        "answer_references": _default(references.answer_references, "seed"),
        "write_plots": _default(figures.write_plots, "seed"),
        "simulate_cohort": _default(simulate_cohort, "seed"),
        "Augment": Augment().seed,
        "Augment.scan": Augment.scan().seed,
        "sft_dataset": _default(data.sft_dataset, "seed"),
        "grpo_dataset": _default(data.grpo_dataset, "seed"),
        "ecg-r1 simulate": _cli_defaults("simulate", "--out", "o")["seed"],
        "ecg-r1 render": _cli_defaults("render", "c", "--out", "o")["seed"],
        "SimulationConfig": SimulationConfig.model_fields["seed"].default,
        "SplitConfig": SplitConfig.model_fields["seed"].default,
        "BaselineConfig": BaselineConfig.model_fields["seed"].default,
        "ComparisonConfig": ComparisonConfig.model_fields["seed"].default,
    }
    assert seeds == dict.fromkeys(seeds, constants.DEFAULT_SEED)
