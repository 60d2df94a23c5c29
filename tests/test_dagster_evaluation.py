"""The evaluation assets materialized on a tiny setup: baselines, comparison, and promotion in both
directions (a better challenger promoted, a worse one refused), with a temporary MLflow store.

The "better" model is the tiny model taught to answer ``Yes`` in the output format on every case
(a few optimizer steps on the prompt + that answer): it is right on every ischemic case, where the
untrained model is never right (its output is always invalid).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from test_train import make_cohort, tiny_test_profile

from dagster_project.defs.assets import evaluation_assets as ev
from dagster_project.defs.resources import DataLayout, DvcResource, MlflowResource
from ecg_r1.modeling.build import build_base_model, corpus_from_cases
from ecg_r1.modeling.contract import format_target, parse_completion
from ecg_r1.modeling.models import load_model_and_processor, save_model_folder
from ecg_r1.modeling.profiles import load_profile
from ecg_r1.tracking import model_registry
from ecg_r1.tracking import runs as tracking

ASSETS = [
    ev.reference_baselines,
    ev.model_comparison,
    ev.model_promotion,
    ev.check_evaluation_metrics_finite,
    ev.check_every_judged_model_has_a_champion,
]


def always_yes_model(model_dir: Path, profile, cases: pl.DataFrame, out: Path, steps: int = 40) -> Path:
    """The model trained to write ``<think></think><answer>Yes</answer>`` whatever it is shown."""
    import torch
    from PIL import Image

    from ecg_r1.modeling.inference import prompt_texts

    torch.manual_seed(0)
    model, processor = load_model_and_processor(model_dir, profile)
    rows = cases.select("image_path", "age", "sex", "note").to_dicts()
    examples = [{**r, "image": Image.open(r["image_path"]).convert("RGB")} for r in rows]
    target = format_target(True) + "<|im_end|>"
    texts = [t + target for t in prompt_texts(processor, examples)]
    n_target = len(processor.tokenizer(target, add_special_tokens=False)["input_ids"])
    processor.tokenizer.padding_side = "left"  # every target ends at the last positions
    inputs = processor(text=texts, images=[e["image"] for e in examples], return_tensors="pt", padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -n_target:] = inputs["input_ids"][:, -n_target:]
    # Only the language model learns (the answer ignores the image): the vision tower's backward
    # pass would cost most of the time.
    model.model.visual.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    processor.tokenizer.padding_side = "right"
    model.eval()
    return save_model_folder(model, processor, out)


def stage(models_dir: Path, asset: str, model_dir: Path, registered: str) -> None:
    """A finished training stage folder as the model assets write it."""
    folder = models_dir / asset
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    history = [{"step": s, "reward": 0.1 * s, "rewards/format/mean": 0.1 * s} for s in (1, 2, 3)]
    result = {
        "stage": "grpo",
        "model_dir": str(model_dir),
        "run_id": None,
        "registered": registered,
        "steps": 3,
        "resumed_from": 0,
        "seconds": 1.0,
        "seconds_per_step": 0.3,
        "samples_per_second": 1.0,
        "peak_rss_mb": 1.0,
        "metrics": {},
        "history": history,
    }
    (folder / "result.json").write_text(json.dumps(result))


def register(profile_path: Path, model_dir: Path, name: str) -> str:
    # The test profile is a YAML file, not a shipped name: the served model carries it.
    profile = load_profile(profile_path)
    with tracking.start_or_resume_run(profile.name, f"train {name}") as run:
        version = model_registry.register_model_version(run.info.run_id, model_dir, name, profile=profile)
    return f"{name}/{version}"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, seed_mlflow_db) -> dict:
    root = tmp_path_factory.mktemp("home")
    seed_mlflow_db(root / "mlflow" / "mlflow.db")
    data = make_cohort(root / "data", n=32)
    shutil.move(str(data["splits"]), root / "data" / "splits_dir.parquet")
    (root / "data" / "splits").mkdir()
    shutil.move(str(root / "data" / "splits_dir.parquet"), root / "data" / "splits" / "splits.parquet")
    cohort = pl.read_parquet(data["cohort"] / "cohort.parquet")
    (root / "data" / "raw" / "simulated").mkdir(parents=True)
    cohort.select(
        "record_id",
        pl.when(pl.col("label") == "ischemic").then(0.8).otherwise(0.3).alias("posterior_ischemic"),
        (pl.lit("in English: ") + pl.col("note")).alias("note_english"),
    ).write_parquet(root / "data" / "raw" / "simulated" / "truth.parquet")
    profile_path = tiny_test_profile(root / "profile.yaml", grpo={"max_completion_length": 16})
    profile = load_profile(profile_path)
    untrained = build_base_model(profile, corpus_from_cases(cohort.to_dicts()), root / "untrained")
    from ecg_r1.evaluation.cases import evaluation_cases

    cases = evaluation_cases(
        data["cohort"], root / "data" / "splits" / "splits.parquet", data["images"], "train"
    )
    yes = always_yes_model(untrained, profile, cases.head(2), root / "always_yes")
    return {"root": root, "profile": profile_path, "untrained": untrained, "yes": yes}


def run_config(profile: Path, rows: tuple[str, ...]) -> dict:
    assets = {"GRPO": "grpo_model", "SFT": "sft_model"}
    return {
        "ops": {
            "reference_baselines": {"config": {"max_iter": 30}},
            "model_comparison": {
                "config": {
                    "models": {row: assets[row] for row in rows},
                    "pairs": [["GRPO", "SFT"]],
                    "profile": str(profile),
                    "n_boot": 200,
                    "n_case_figures": 2,
                }
            },
            "model_promotion": {"config": {"candidates": ["SFT", "GRPO"], "alpha": 0.1}},
        }
    }


def materialize(home: dict, rows: tuple[str, ...] = ("GRPO",)) -> dg.ExecuteInProcessResult:
    root = home["root"]
    return dg.materialize(
        ASSETS,
        resources={
            "layout": DataLayout(home=str(root), splits_dir="data/splits"),
            "dvc": DvcResource(home=str(root), track=False),
            "mlflow": MlflowResource(home=str(root)),
        },
        run_config=run_config(home["profile"], rows),
    )


def metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)]
    assert events, f"{key} was not materialized"
    return events[-1].materialization.metadata


@pytest.mark.slow
def test_the_always_yes_model_answers_yes(home):
    from ecg_r1.evaluation.cases import evaluation_cases
    from ecg_r1.evaluation.predictions import predict_cases

    root = home["root"]
    cases = evaluation_cases(
        root / "data" / "cohort",
        root / "data" / "splits" / "splits.parquet",
        root / "data" / "images",
        "test_external",
    )
    _, completions = predict_cases(home["yes"], home["profile"], cases, max_new_tokens=16)
    assert all(parse_completion(c).answer is True for c in completions), completions


@pytest.mark.slow
def test_evaluation_assets_and_promotion_both_ways(home, monkeypatch):
    root = home["root"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow/mlflow.db")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{root}/mlflow/mlflow.db")
    MlflowResource(home=str(root)).configure()
    profile_name = load_profile(home["profile"]).name
    models = root / "data" / "models"

    # 1. First versions: no champion yet, so both are promoted.
    stage(models, "sft_model", home["untrained"], register(home["profile"], home["untrained"], "ecg-r1-sft"))
    stage(
        models, "grpo_model", home["untrained"], register(home["profile"], home["untrained"], "ecg-r1-grpo")
    )
    result = materialize(home, ("GRPO", "SFT"))
    assert result.success
    assert model_registry.alias_version("ecg-r1-sft", "champion") == 1
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "check_evaluation_metrics_finite": True,
        "check_every_judged_model_has_a_champion": True,
    }
    from mlflow import MlflowClient

    comparison = metadata(result, "model_comparison")
    table = comparison["comparison"].value
    for row in (
        "| GRPO |",
        "| GRPO (no ECG) |",
        "| GRPO (note in English) |",
        "| SFT |",
        "Feature baseline",
        "Majority class",
        "Bayes-optimal ceiling",
        "Clinicians",
    ):
        assert row in table, row
    assert comparison["grpo_test_external_valid_rate"].value == 0.0
    for split in ("test_internal", "test_external"):
        assert 0.0 <= comparison[f"note_words_unseen_{split}"].value <= 1.0
        # make_cohort's two hospitals write the same notes: none unreadable.
        assert comparison[f"notes_unreadable_{split}"].value == 0.0
    assert "Note words the models never saw" in table
    assert comparison["plot_confusion_matrices"].value.startswith(
        "![confusion_matrices.png](data:image/png;base64,"
    )
    evaluation_run = MlflowClient().get_run(comparison["evaluation_run_id"].value)
    assert evaluation_run.info.experiment_id == tracking.experiment_for(profile_name)
    artifacts = {a.path for a in MlflowClient().list_artifacts(evaluation_run.info.run_id, "evaluation")}
    assert "evaluation/comparison.md" in artifacts and "evaluation/plots" in artifacts
    assert model_registry.alias_version("ecg-r1-grpo", "champion") == 1
    # The metrics sit on the version's run, so the MLflow UI compares versions side by side.
    run = MlflowClient().get_run(model_registry.version_run_id("ecg-r1-grpo", 1))
    assert run.data.metrics["test_external/accuracy"] == 0.0
    assert run.data.metrics["test_external/n"] == 8

    # 2. A better challenger (right on every ischemic case) replaces the champion. (Only the GRPO
    # row from here on, to keep the test short.)
    stage(models, "grpo_model", home["yes"], register(home["profile"], home["yes"], "ecg-r1-grpo"))
    result = materialize(home)
    promotion = metadata(result, "model_promotion")
    assert promotion["ecg_r1_grpo_decision"].value == "promoted"
    assert (
        promotion["ecg_r1_grpo_challenger_accuracy"].value > promotion["ecg_r1_grpo_champion_accuracy"].value
    )
    assert model_registry.alias_version("ecg-r1-grpo", "champion") == 2

    # 3. A worse challenger (never right) is refused: the champion stays.
    stage(
        models, "grpo_model", home["untrained"], register(home["profile"], home["untrained"], "ecg-r1-grpo")
    )
    result = materialize(home)
    promotion = metadata(result, "model_promotion")
    assert promotion["ecg_r1_grpo_decision"].value == "refused"
    assert promotion["ecg_r1_grpo_mcnemar_p_mid"].value < 0.1
    assert model_registry.alias_version("ecg-r1-grpo", "champion") == 2
    assert model_registry.alias_version("ecg-r1-grpo", "challenger") == 3
    tags = MlflowClient().get_model_version("ecg-r1-grpo", "3").tags
    assert tags["promotion.decision"] == "refused"


@pytest.mark.slow
def test_real_record_cohort_feeds_the_comparison(home, monkeypatch):
    """Nothing configured: no folder, no section. Records named in the environment: a section."""
    from test_real_records import REAL_ROWS, write_real_export

    from ecg_r1.evaluation.real_records import ENV_VAR, REAL_SPLIT, REAL_TITLE, SUMMARY_FILE

    root = home["root"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow/mlflow.db")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{root}/mlflow/mlflow.db")
    stage(root / "data" / "models", "grpo_model", home["untrained"], None)
    resources = {
        "layout": DataLayout(home=str(root), splits_dir="data/splits"),
        "dvc": DvcResource(home=str(root), track=False),
        "mlflow": MlflowResource(home=str(root)),
    }
    config = run_config(home["profile"], ("GRPO",))
    config["ops"]["real_record_cohort"] = {"config": {"profile": str(home["profile"]), "workers": 1}}
    real_dir = root / "data" / "real_records"

    monkeypatch.delenv(ENV_VAR, raising=False)
    real_dir.mkdir(parents=True, exist_ok=True)
    (real_dir / SUMMARY_FILE).write_text("{}")  # left by an earlier run with records configured
    only_real = {"ops": {"real_record_cohort": config["ops"]["real_record_cohort"]}}
    result = dg.materialize([ev.real_record_cohort], resources=resources, run_config=only_real)
    assert result.success and metadata(result, "real_record_cohort")["configured"].value is False
    assert not real_dir.exists()

    monkeypatch.setenv(ENV_VAR, str(write_real_export(root / "real_export")))
    del config["ops"]["model_promotion"]
    assets = [ev.real_record_cohort, ev.reference_baselines, ev.model_comparison]
    result = dg.materialize(assets, resources=resources, run_config=config)
    assert result.success
    real = metadata(result, "real_record_cohort")
    assert real["records"].value == len(REAL_ROWS) and real["cases"].value == 7
    comparison = metadata(result, "model_comparison")
    # R-5 is not in this main cohort (no shared checksum here); sim/0000 is, so 6 of 7 remain.
    assert comparison[f"grpo_{REAL_SPLIT}_n"].value == 6
    assert f"| GRPO | {REAL_TITLE} | 6 |" in comparison["comparison"].value
    assert f"| Majority class | {REAL_TITLE} | 6 |" in comparison["comparison"].value


@pytest.mark.slow
def test_where_prints_table_registry_and_uis(home, capsys):
    from ecg_r1.cli import main

    root = home["root"]
    assert main(["where", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    if (root / "data" / "evaluation" / "comparison.md").is_file():
        assert "| Majority class |" in out
    else:
        assert "no comparison yet" in out
    assert f"sqlite:///{root.resolve()}/mlflow/mlflow.db" in out
    assert "make ui" in out and "http://127.0.0.1:3000" in out
    assert "make mlflow-ui" in out and "http://127.0.0.1:5000" in out
