"""Training stages on the tiny profile: datasets, vision pre-training, format warm-up, SFT, GRPO,
MLflow runs and registered versions. Everything runs on a handful of small generated cases in
``tmp_path`` with a shrunken copy of the tiny profile. The tests that build or train a model are
marked slow (the base model alone takes about 20 s on a busy 2-core machine); the dataset, case
and CLI tests run in ``make test-fast``."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from ecg_r1.data.canonical import FS, LEADS, N_SAMPLES
from ecg_r1.data.store import COHORT_FILE, COHORT_SCHEMA, SignalWriter

ANTERIOR = ("V1", "V2", "V3", "V4")
LATERAL = ("I", "aVL", "V5", "V6")


def synthetic_signal(
    rng: np.random.Generator, inverted: tuple[str, ...], wide_qrs: bool = False
) -> np.ndarray:
    """A 10 s, 12-lead beat train: QRS and T bumps, T inverted in the given leads (mV)."""
    t = np.arange(N_SAMPLES) / FS
    rr = 60.0 / rng.uniform(60, 90)
    beats = np.arange(0.4, 10.0 - 0.6, rr)
    qrs_width = 0.035 if wide_qrs else 0.015
    out = np.zeros((len(LEADS), N_SAMPLES), dtype=np.float64)
    for j, lead in enumerate(LEADS):
        r_amp = rng.uniform(0.6, 1.4) * (-1 if lead in ("aVR", "V1") else 1)
        t_amp = rng.uniform(0.2, 0.4) * (-1 if lead in inverted or lead == "aVR" else 1)
        for b in beats:
            out[j] += r_amp * np.exp(-0.5 * ((t - b) / qrs_width) ** 2)
            out[j] += t_amp * np.exp(-0.5 * ((t - b - 0.3) / 0.05) ** 2)
        out[j] += rng.normal(0, 0.01, N_SAMPLES)
    return out.astype(np.float32)


def make_cohort(root: Path, n: int = 24, seed: int = 0, width: int = 224) -> dict[str, Path]:
    """Write a small labelled TWI cohort, its splits and 224 px images under ``root``.

    Ischemic cases have anterior TWI and a note with a raised troponin; non-ischemic ones lateral
    TWI and a wide QRS. Two hospitals, the second held out as ``test_external``.

    Returns:
        ``{"cohort": dir, "splits": parquet, "images": dir}``.
    """
    from ecg_r1.imaging.page import CLINICAL, with_size
    from ecg_r1.imaging.render import render_cohort

    rng = np.random.default_rng(seed)
    cohort_dir = root / "cohort"
    rows = []
    with SignalWriter(cohort_dir) as writer:
        for i in range(n):
            ischemic = i % 2 == 0
            leads = ANTERIOR if ischemic else LATERAL
            row = writer.append(synthetic_signal(rng, leads, wide_qrs=not ischemic))
            hospital = "H1" if i < n * 3 // 4 else "H2"
            note = "chest pain, troponin raised" if ischemic else "palpitations, troponin normal"
            rows.append(
                {
                    "record_id": f"sim/{i:04d}",
                    "patient_id": f"p{i:04d}",
                    "hospital": hospital,
                    "source_format": "manifest",
                    "source_path": f"sim/{i:04d}.hea",
                    "checksum": f"{i:064x}",
                    "source_fs": float(FS),
                    "source_gain": 1000.0,
                    "derived_leads": "",
                    "cropped_samples": 0,
                    "padded_samples": 0,
                    "age": float(rng.integers(30, 80)),
                    "sex": "M" if i % 3 else "F",
                    "note": note,
                    "report": None,
                    "raw_codes": "",
                    "twi": True,
                    "twi_leads": ",".join(leads),
                    "label": "ischemic" if ischemic else "non-ischemic",
                    "row": row,
                }
            )
    pl.DataFrame(rows, schema=COHORT_SCHEMA).write_parquet(cohort_dir / COHORT_FILE)
    internal = [r for r in rows if r["hospital"] == "H1"]
    split_rows = []
    for k, r in enumerate(internal):
        split = "test_internal" if k % 6 == 5 else ("val" if k % 6 == 4 else "train")
        split_rows.append((r["record_id"], r["patient_id"], r["hospital"], r["label"], split))
    split_rows += [
        (r["record_id"], r["patient_id"], r["hospital"], r["label"], "test_external")
        for r in rows
        if r["hospital"] == "H2"
    ]
    splits = root / "splits.parquet"
    pl.DataFrame(
        split_rows, schema=["record_id", "patient_id", "hospital", "label", "split"], orient="row"
    ).write_parquet(splits)
    images = root / "images"
    render_cohort(cohort_dir, images, with_size(CLINICAL, width), workers=1)
    return {"cohort": cohort_dir, "splits": splits, "images": images}


def tiny_test_profile(path: Path, **overrides: dict) -> Path:
    """A copy of the tiny profile with a smaller model and short stages, written to ``path``."""
    from ecg_r1.modeling.profiles import PROFILES_DIR

    raw = yaml.safe_load((PROFILES_DIR / "tiny.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["name"] = "tiny-test"
    tiny = raw["model"]["tiny"]
    tiny["text"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    tiny["vision"].update(embed_dim=32, depth=2, num_heads=4)
    tiny["tokenizer"].update(vocab_size=400)
    raw["sft"].update(per_device_train_batch_size=4, logging_steps=1, save_steps=1000)
    raw["grpo"].update(
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        logging_steps=1,
        save_steps=1000,
    )
    raw["stages"]["vision_pretrain"].update(batch_size=8)
    raw["stages"]["format_warmup"].update(batch_size=4)
    for section, values in overrides.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory):
    from ecg_r1.modeling.profiles import load_profile

    return load_profile(tiny_test_profile(tmp_path_factory.mktemp("profile") / "tiny-test.yaml"))


@pytest.fixture(scope="module")
def one_thread():
    # Tiny matrices: one thread avoids OpenMP spin contention on a shared 2-core machine.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory, seed_mlflow_db):
    """A temporary MLflow store (SQLite + artifacts) for this module; the previous one restored."""
    import os

    import mlflow
    from ecg_r1.tracking import runs as tracking

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    previous = mlflow.get_tracking_uri()
    root = tmp_path_factory.mktemp("mlflow")
    seed_mlflow_db(root / "mlflow" / "mlflow.db")
    uri = tracking.configure(root)
    yield uri
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    mlflow.set_tracking_uri(previous)
    mlflow.set_registry_uri(previous)


@pytest.fixture(scope="module")
def base_model(data, profile, tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    from ecg_r1.training.stages import build_start_model

    return build_start_model(
        profile, data["cohort"], data["splits"], data["images"], tmp_path_factory.mktemp("base") / "model"
    )


def _data_kwargs(data: dict[str, Path]) -> dict[str, Path]:
    return {"cohort_dir": data["cohort"], "splits_path": data["splits"], "images_dir": data["images"]}


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray], prefix: str = "") -> list[str]:
    return [k for k in before if k.startswith(prefix) and not np.array_equal(before[k], after[k])]


def _metric_steps(run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


class TestLoadCases:
    def test_keeps_labelled_twi_cases_of_the_split_with_their_images(self, data):
        from ecg_r1.training.data import load_cases

        train = load_cases(data["cohort"], data["splits"], data["images"], "train")
        splits = pl.read_parquet(data["splits"])
        assert train.height == splits.filter(pl.col("split") == "train").height
        assert train["label"].dtype == pl.Boolean and train["label"].null_count() == 0
        assert all(Path(p).is_file() for p in train["image_path"])
        external = load_cases(data["cohort"], data["splits"], data["images"], "test_external")
        assert set(external["hospital"]) == {"H2"}

    def test_a_case_without_an_image_is_an_error_not_a_silent_drop(self, data, tmp_path):
        from ecg_r1.training.data import TrainingDataError, load_cases

        index = pl.read_parquet(data["images"] / "index.parquet")
        images = tmp_path / "images"
        images.mkdir()
        index.slice(1).write_parquet(images / "index.parquet")
        dropped = index["record_id"][0]
        split = pl.read_parquet(data["splits"]).filter(pl.col("record_id") == dropped)["split"][0]
        with pytest.raises(TrainingDataError, match="no image"):
            load_cases(data["cohort"], data["splits"], images, split)

    def test_unknown_split_names_the_known_ones(self, data):
        from ecg_r1.training.data import TrainingDataError, load_cases

        with pytest.raises(TrainingDataError, match="test_internal"):
            load_cases(data["cohort"], data["splits"], data["images"], "training")


class TestDatasets:
    def test_grpo_rows_carry_prompt_image_and_reward_columns(self, data):
        from ecg_r1.training.data import grpo_dataset, load_cases

        cases = load_cases(data["cohort"], data["splits"], data["images"], "train")
        row = grpo_dataset(cases)[0]
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert cases["note"][0] in row["prompt"][1]["content"]
        assert row["image"].size == (224, 173)
        assert row["label"] is cases["label"][0]
        assert row["twi_leads"] == cases["twi_leads"][0]

    def test_sft_targets_follow_the_contract_and_the_rationale_never_states_the_label(self, data):
        from ecg_r1.modeling.contract import parse_completion
        from ecg_r1.training.data import load_cases, sft_targets

        cases = load_cases(data["cohort"], data["splits"], data["images"], "train")
        targets = sft_targets(cases, rationale=True)
        flipped = sft_targets(cases, rationale=True, answers=[not a for a in cases["label"]])
        for target, other, label in zip(targets, flipped, cases["label"], strict=True):
            parsed = parse_completion(target)
            assert parsed.valid and parsed.answer is label
            assert parse_completion(other).think == parsed.think  # same reasoning for either answer
            assert "T-wave inversion in" in parsed.think
        bare = parse_completion(sft_targets(cases, rationale=False)[0])
        assert bare.valid and bare.think == ""

    def test_findings_rationale_states_what_was_measured_before_the_answer(self, data):
        from ecg_r1.modeling.contract import parse_completion
        from ecg_r1.training.data import case_findings, load_cases, sft_targets

        cases = load_cases(data["cohort"], data["splits"], data["images"], "train")
        findings = case_findings(cases, data["cohort"])
        assert findings["record_id"].to_list() == cases["record_id"].to_list()
        targets = sft_targets(cases, rationale=True, findings=findings)
        for target, label, measured in zip(
            targets, cases["label"], findings.iter_rows(named=True), strict=True
        ):
            parsed = parse_completion(target)
            assert parsed.valid and parsed.answer is label
            assert ("Wide QRS." if measured["qrs_ms"] >= 120 else "Narrow QRS.") in parsed.think
            assert "ischemi" not in parsed.think.lower()  # findings, never the verdict
        # The synthetic non-ischemic cases have the wide QRS: the rationale says so, from the signal.
        wide = ["Wide QRS." in parse_completion(t).think for t in targets]
        assert wide == [not label for label in cases["label"]]
        with pytest.raises(ValueError, match="one per case"):
            sft_targets(cases, rationale=True, findings=findings.head(1))

    def test_note_dropout_hides_a_seeded_fraction_of_notes(self, data):
        from ecg_r1.training.data import PromptOptions, grpo_dataset, load_cases, sft_dataset, sft_targets

        cases = load_cases(data["cohort"], data["splits"], data["images"], "train")
        targets = sft_targets(cases, rationale=False)

        def hidden(dataset) -> list[bool]:
            return ["Clinical note: none given" in row["prompt"][1]["content"] for row in dataset]

        assert not any(hidden(sft_dataset(cases, targets)))
        assert all(hidden(sft_dataset(cases, targets, PromptOptions(note_dropout=1.0))))
        half = hidden(sft_dataset(cases, targets, PromptOptions(note_dropout=0.5), seed=3))
        assert 0 < sum(half) < len(half)
        assert half == hidden(sft_dataset(cases, targets, PromptOptions(note_dropout=0.5), seed=3))  # seeded
        assert half == hidden(
            grpo_dataset(cases, PromptOptions(note_dropout=0.5), seed=3)
        )  # same draw for GRPO
        with pytest.raises(ValueError, match="fraction"):
            PromptOptions(note_dropout=1.5)
        with pytest.raises(ValueError, match="sum to at most 1"):
            PromptOptions(note_dropout=0.6, note_scramble=0.6)

    def test_note_scramble_keeps_numbers_and_letters_but_not_words(self, data):
        import random

        from ecg_r1.training.data import PromptOptions, grpo_dataset, load_cases, scramble_note

        note = "Troponin 45 ng/L, chest pain since 2 hours; K+ 4.1 mmol/L."
        scrambled = scramble_note(note, random.Random(1))
        assert scrambled != note and len(scrambled) == len(note)
        assert sorted(scrambled) == sorted(note)  # the same characters
        assert [w for w in scrambled.split() if any(c.isdigit() for c in w)] == ["45", "2", "4.1"]
        assert scrambled == scramble_note(note, random.Random(1))
        assert scramble_note(None, random.Random(1)) is None

        cases = load_cases(data["cohort"], data["splits"], data["images"], "train")
        rows = grpo_dataset(cases, PromptOptions(note_scramble=1.0), seed=0)
        for row, original in zip(rows, cases["note"], strict=True):
            shown = row["prompt"][1]["content"]
            assert original not in shown and sorted(original) == sorted(
                shown.split("Clinical note: ")[1].split("\n")[0]
            )

    def test_prompt_options_read_the_stage_and_the_profile(self, tmp_path):
        from ecg_r1.modeling.profiles import load_profile
        from ecg_r1.training.data import PromptOptions, prompt_options

        profile = load_profile(
            tiny_test_profile(
                tmp_path / "p.yaml",
                stages={"sft": {"note_dropout": 0.2, "note_scramble": 0.1}, "grpo": {"note_dropout": 0.3}},
                image={"position": "before_question"},
                model={"unseen_note_words": "mark"},
            )
        )
        assert prompt_options(profile, "sft") == PromptOptions(
            note_dropout=0.2, note_scramble=0.1, image_position="before_question", unseen_note_words="mark"
        )
        assert prompt_options(profile, "grpo") == PromptOptions(
            note_dropout=0.3, image_position="before_question", unseen_note_words="mark"
        )


@pytest.mark.slow  # every test here builds or trains a model
class TestAnswerMasking:
    def test_only_the_answer_word_leaves_the_loss(self, base_model, profile):
        import torch

        from ecg_r1.modeling.contract import format_target
        from ecg_r1.modeling.processor import load_processor
        from ecg_r1.training.sft import AnswerMaskingCollator

        processor = load_processor(base_model, profile)
        tok = processor.tokenizer
        rows = [
            tok.encode(format_target(answer, "T-wave inversion in V1-V4."), add_special_tokens=False)
            for answer in (True, False)
        ]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])

        def collate(_: list) -> dict:
            return {"input_ids": ids.clone(), "labels": ids.clone()}

        batch = AnswerMaskingCollator(collate, tok)([{}, {}])
        for row, answer in zip(range(2), ("Yes", "No"), strict=True):
            masked = (batch["labels"][row] == -100).nonzero().flatten().tolist()
            assert tok.decode(ids[row, masked]) == answer
        with pytest.raises(ValueError, match="no Yes/No answer"):
            AnswerMaskingCollator(lambda _: {"input_ids": ids[:, :5], "labels": ids[:, :5].clone()}, tok)(
                [{}]
            )


class TestVisionPretrain:
    @pytest.mark.slow
    def test_trains_the_vision_tower_on_signal_measurements_and_leaves_the_language_model(
        self, data, profile, base_model, tmp_path, mlflow_store
    ):
        from ecg_r1.training.stages import run_vision_stage

        result = run_vision_stage(
            profile, base_model, **_data_kwargs(data), out_dir=tmp_path / "vision", max_steps=3
        )
        before, after = _weights(base_model), _weights(result.model_dir)
        changed = _changed(before, after)
        assert changed and all(k.startswith("visual.") for k in changed)
        assert _changed(before, after, "visual.merger")  # the tokens the LM reads changed
        assert _metric_steps(result.run_id, "twi_loss") == [3]
        assert np.isfinite(result.metrics["loss"])

    @pytest.mark.slow
    @pytest.mark.parametrize("head", ["pooled", "positional+pooled"])
    def test_every_readout_head_trains_the_tower(self, data, base_model, tmp_path, head):
        from ecg_r1.training.stages import run_vision_stage

        settings = {"head": head, "batch_size": 8}
        profile = tiny_test_profile(tmp_path / "p.yaml", stages={"vision_pretrain": settings})
        result = run_vision_stage(
            profile,
            base_model,
            **_data_kwargs(data),
            out_dir=tmp_path / "vision",
            max_steps=2,
            tracking=False,
        )
        assert _changed(_weights(base_model), _weights(result.model_dir), "visual.merger")
        assert np.isfinite(result.metrics["loss"]) and 0 <= result.metrics["eval_twi_f1"] <= 1

    @pytest.mark.slow
    def test_page_tokens_are_the_image_embeddings_the_language_model_receives(
        self, data, profile, base_model
    ):
        import torch
        from PIL import Image

        from ecg_r1.modeling.models import load_model_and_processor
        from ecg_r1.training.vision_readout import page_tokens

        model, processor = load_model_and_processor(base_model, profile)
        paths = sorted(str(p) for p in data["images"].rglob("*.png"))[:3]
        tokens = page_tokens(model, processor, paths, batch_size=2)
        pages = [Image.open(p).convert("RGB") for p in paths]
        enc = processor.image_processor(images=pages, return_tensors="pt")
        with torch.no_grad():
            expected = model.model.get_image_features(
                enc["pixel_values"], enc["image_grid_thw"]
            ).pooler_output
        assert tokens.shape == (3, *expected[0].shape)
        for got, want in zip(tokens, expected, strict=True):  # up to the float16 pixel cache
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)

    @staticmethod
    def _learning_rates(steps: int) -> list[float]:
        """The learning rate of each of ``steps`` optimiser steps under the stage's schedule, as
        fractions of the peak (the stage steps the schedule once per optimiser step)."""
        import torch

        from ecg_r1.training.vision import _lr_schedule

        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler, rates = _lr_schedule(optimizer, steps), []
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates

    def test_the_learning_rate_warms_up_over_5_percent_then_follows_a_cosine_to_zero(self):
        import math

        rates = self._learning_rates(300)
        assert rates[:15] == [k / 15 for k in range(15)]  # linear from 0 over 15 = 300 // 20 steps
        assert rates[15] == 1.0
        for step in (16, 100, 157, 299):
            assert rates[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 15) / 285)), rel=1e-12)

    def test_a_run_under_20_steps_has_no_warm_up(self):
        # the values of the schedule written by hand before, which short runs (the tests') keep
        assert self._learning_rates(3) == [1.0, 0.75, 0.2500000000000001]

    @pytest.mark.parametrize(
        ("truth", "predicted", "f1"),
        [
            ([1, 1, 0, 0], [1, 0, 1, 0], 0.5),
            ([1, 1, 1, 0, 0], [1, 0, 0, 1, 1], 2 / 6),
            ([1, 0, 1], [1, 0, 1], 1.0),
            ([1, 1, 0], [0, 0, 0], 0.0),
            ([0, 0, 0], [0, 0, 0], 0.0),  # no lead inverted nor predicted: 0, without a warning
        ],
    )
    def test_twi_f1_is_2tp_over_predicted_plus_true_leads(self, truth, predicted, f1):
        import warnings

        from ecg_r1.training.vision import twi_f1

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert twi_f1(np.array(truth, dtype=bool), np.array(predicted, dtype=bool)) == f1

    def test_twi_f1_of_no_measured_lead_is_nan_as_the_accuracy_beside_it(self):
        from ecg_r1.training.vision import twi_f1

        assert np.isnan(twi_f1(np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)))

    @pytest.mark.parametrize(
        "cases", [pl.DataFrame({"image_path": [], "row": []}), pl.DataFrame({"row": [0]})]
    )
    def test_no_case_or_a_missing_column_is_refused_before_any_model_loads(self, cases, tmp_path):
        from ecg_r1.modeling.profiles import load_profile
        from ecg_r1.training.vision import run_vision_pretrain

        with pytest.raises(ValueError, match="image_path and row"):
            run_vision_pretrain(
                tmp_path / "no-model", load_profile("tiny"), cases, tmp_path, tmp_path / "out"
            )
        assert not (tmp_path / "out").exists()

    def test_an_unknown_head_is_refused(self):
        from ecg_r1.training.vision_readout import readout_head

        with pytest.raises(ValueError, match=r"positional\+pooled"):
            readout_head("attention", hidden=8, tokens=4, outputs=3)

    def test_targets_come_from_the_signal_measurements(self, data):
        from ecg_r1.data.features import UPRIGHT_T_LEADS, measure_features
        from ecg_r1.data.store import open_signals
        from ecg_r1.training.vision_readout import measured_targets

        features = measure_features(np.asarray(open_signals(data["cohort"])[:6]))
        targets = measured_targets(features, finding_targets=True)
        cohort = pl.read_parquet(data["cohort"] / "cohort.parquet").head(6)
        from ecg_r1.modeling.findings import FINDING_FLAGS

        assert targets.twi.shape == (6, len(LEADS) + len(FINDING_FLAGS))
        for row, measured, truth, label in zip(
            targets.twi, features["twi_leads"], cohort["twi_leads"], cohort["label"], strict=True
        ):
            found = {lead for lead, flag in zip(LEADS, row[: len(LEADS)], strict=True) if flag == 1}
            assert found == set(measured.split(","))
            # measured, not copied from the cohort: a subset of the drawn inversions, never V1
            # (a negative T is normal there, so the measurement rule leaves it out)
            assert found and found <= set(truth.split(",")) & set(UPRIGHT_T_LEADS)
            flags = dict(zip(FINDING_FLAGS, row[len(LEADS) :], strict=True))
            # make_cohort draws the wide QRS for the non-ischemic cases only
            assert flags["wide_qrs"] == (label == "non-ischemic")
        assert np.allclose(np.nanmean(targets.regression, axis=0), 0, atol=1e-6)


@pytest.fixture(scope="module")
def sft_result(data, profile, base_model, tmp_path_factory: pytest.TempPathFactory, mlflow_store):
    from ecg_r1.training import run_sft

    return run_sft(
        profile, base_model, **_data_kwargs(data), out_dir=tmp_path_factory.mktemp("sft"), max_steps=3
    )


@pytest.mark.slow  # every test here builds or trains a model
class TestSFT:
    def test_a_few_steps_change_the_weights_and_save_a_loadable_model(self, sft_result, base_model, profile):
        from ecg_r1.modeling.models import load_model_and_processor

        changed = _changed(_weights(base_model), _weights(sft_result.model_dir))
        assert any(k.startswith("model.layers.") for k in changed)
        assert sft_result.steps == 3 and sft_result.resumed_from == 0
        model, processor = load_model_and_processor(sft_result.model_dir, profile)
        assert processor.tokenizer.eos_token == "<|im_end|>"

    def test_the_run_logs_params_per_step_metrics_samples_and_a_registered_version(
        self, sft_result, mlflow_store
    ):
        from mlflow import MlflowClient

        client = MlflowClient()
        run = client.get_run(sft_result.run_id)
        params = run.data.params
        for key in (
            "git_commit",
            "data_version",
            "seed",
            "profile.name",
            "trainer.learning_rate",
            "sft_rationale",
        ):
            assert key in params, key
        assert params["profile.name"] == "tiny-test"
        assert _metric_steps(sft_result.run_id, "loss") == [1, 2, 3]
        assert _metric_steps(sft_result.run_id, "learning_rate") == [1, 2, 3]
        assert run.info.status == "FINISHED"
        artifacts = {a.path for a in client.list_artifacts(sft_result.run_id, "samples")}
        assert "samples/completions.json" in artifacts
        name, version = sft_result.registered.split("/")
        assert name == "ecg-r1-sft"
        tags = client.get_model_version(name, version).tags
        assert tags["profile"] == "tiny-test" and tags["stage"] == "sft"
        assert {"data_version", "git_commit", "config"} <= set(tags)
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.name == "ecg-r1-tiny-test"
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        contexts = {i.dataset.name: {t.key: t.value for t in i.tags} for i in run.inputs.dataset_inputs}
        assert contexts["ecg-r1-train"]["mlflow.data.context"] == "train"
        assert contexts["ecg-r1-test_external"]["hospital"] == "H2"

    def test_running_a_finished_stage_again_starts_a_new_run(
        self, data, profile, base_model, sft_result, tmp_path
    ):
        from ecg_r1.training import run_sft
        from ecg_r1.training.runner import RunOptions

        out = tmp_path / "again"
        unregistered = RunOptions(register=False)
        first, second = (
            run_sft(profile, base_model, **_data_kwargs(data), out_dir=out, max_steps=1, options=unregistered)
            for _ in range(2)
        )
        assert first.run_id != second.run_id and second.resumed_from == 0 and second.registered is None

    def test_mixed_precision_on_a_cpu_trains_and_keeps_float32_weights(
        self, data, base_model, tmp_path, mlflow_store
    ):
        from ecg_r1.modeling.profiles import load_profile
        from ecg_r1.training import run_sft
        from mlflow import MlflowClient

        profile = load_profile(tiny_test_profile(tmp_path / "p.yaml", model={"mixed_precision": "bfloat16"}))
        result = run_sft(profile, base_model, **_data_kwargs(data), out_dir=tmp_path / "sft", max_steps=2)
        params = MlflowClient().get_run(result.run_id).data.params
        assert params["trainer.bf16"] == "True"
        weights = _weights(result.model_dir)
        assert _changed(_weights(base_model), weights)
        assert {w.dtype for w in weights.values()} == {np.dtype("float32")}


@pytest.mark.slow  # every test here builds or trains a model
class TestFormatWarmup:
    def test_masked_warmup_trains_without_labels_and_registers_nothing(
        self, data, profile, base_model, tmp_path, mlflow_store
    ):
        from ecg_r1.training import run_format_warmup
        from mlflow import MlflowClient

        result = run_format_warmup(
            profile,
            base_model,
            **_data_kwargs(data),
            out_dir=tmp_path / "warmup",
            max_steps=2,
            answer="masked",
        )
        assert _changed(_weights(base_model), _weights(result.model_dir))
        assert result.registered is None
        assert MlflowClient().get_run(result.run_id).data.params["warmup_answer"] == "masked"
        logged = {Path(a.path).name for a in MlflowClient().list_artifacts(result.run_id, "model")}
        assert {"config.json", "model.safetensors"} <= logged

    def test_unknown_answer_mode_is_refused(self, data, profile, base_model, tmp_path):
        from ecg_r1.training import run_format_warmup

        with pytest.raises(ValueError, match="masked"):
            run_format_warmup(profile, base_model, **_data_kwargs(data), out_dir=tmp_path, answer="label")


def length_reward(completions: list, **kwargs) -> list[float]:
    """A reward with spread for any model (a random model never writes the format, so format and
    accuracy are all 0 and GRPO's advantages vanish)."""
    from ecg_r1.modeling.contract import completion_text

    return [len(completion_text(c)) / 100 for c in completions]


@pytest.mark.slow  # every test here builds or trains a model
class TestGRPO:
    def test_a_few_steps_change_the_weights_and_log_each_reward(
        self, data, profile, sft_result, tmp_path, mlflow_store, monkeypatch
    ):
        from ecg_r1.training import rewards, run_grpo
        from mlflow import MlflowClient

        monkeypatch.setitem(rewards.REWARD_FUNCS, "length", length_reward)
        with_length = replace(profile, rewards={"format": 1.0, "accuracy": 1.0, "length": 1.0})
        result = run_grpo(
            with_length, sft_result.model_dir, **_data_kwargs(data), out_dir=tmp_path / "grpo", max_steps=2
        )
        changed = _changed(_weights(sft_result.model_dir), _weights(result.model_dir))
        assert any(k.startswith("model.layers.") for k in changed)
        for key in (
            "rewards/format_reward/mean",
            "rewards/accuracy_reward/mean",
            "rewards/length_reward/mean",
            "frac_reward_zero_std",  # the zero-advantage share, every step (kl only with beta > 0)
            "completions/mean_length",
            "format_valid_rate",
            "learning_rate",
            "loss",
        ):
            assert _metric_steps(result.run_id, key) == [1, 2], key
        client = MlflowClient()
        params = client.get_run(result.run_id).data.params
        assert params["trainer.num_generations"] == "4" and params["trainer.beta"] == str(
            profile.grpo["beta"]
        )
        assert params["rewards.length"] == "1.0"
        assert result.registered.startswith("ecg-r1-grpo/")
        samples = client.list_artifacts(result.run_id, "samples")
        assert [a.path for a in samples] == ["samples/completions.json"]

    def test_sft_and_grpo_train_with_the_page_before_the_question(
        self, data, base_model, tmp_path, mlflow_store
    ):
        from ecg_r1.training import run_grpo, run_sft
        from ecg_r1.training.data import PromptOptions, grpo_dataset, load_cases
        from ecg_r1.training.runner import RunOptions

        profile = tiny_test_profile(tmp_path / "p.yaml", image={"position": "before_question"})
        cases = load_cases(data["cohort"], data["splits"], data["images"], "train")
        user = grpo_dataset(cases, PromptOptions(image_position="before_question"))[0]["prompt"][1]["content"]
        assert [part["type"] for part in user] == ["text", "image", "text"]
        sft = run_sft(
            profile,
            base_model,
            **_data_kwargs(data),
            out_dir=tmp_path / "sft",
            max_steps=1,
            options=RunOptions(register=False),
        )
        # tracked, so the completion samples (which read these prompts back) are logged too
        grpo = run_grpo(profile, sft.model_dir, **_data_kwargs(data), out_dir=tmp_path / "grpo", max_steps=1)
        assert grpo.steps == 1 and np.isfinite(grpo.metrics["loss"])

    def test_marking_unseen_note_words_trains_on_marked_notes_and_carries_the_vocabulary(
        self, data, base_model, tmp_path
    ):
        from ecg_r1.modeling.notes import note_vocabulary, note_words
        from ecg_r1.modeling.processor import read_note_vocabulary
        from ecg_r1.training import run_sft
        from ecg_r1.training.data import PromptOptions, load_cases, sft_dataset, sft_targets
        from ecg_r1.training.runner import RunOptions

        cases = load_cases(data["cohort"], data["splits"], data["images"], "train")
        targets = sft_targets(cases, rationale=False)
        marked = sft_dataset(cases, targets, PromptOptions(note_scramble=1.0, unseen_note_words="mark"))
        scrambled = sft_dataset(cases, targets, PromptOptions(note_scramble=1.0), seed=0)
        for row_marked, row_scrambled, note in zip(marked, scrambled, cases["note"], strict=True):
            text_marked = row_marked["prompt"][1]["content"]
            assert "Clinical note:" in text_marked
            shown = text_marked.split("Clinical note: ")[1].split("\n")[0]
            assert note_words(shown) == [] and shown.count("?") == len(note_words(note)) > 0, shown
            assert row_scrambled["prompt"][1]["content"] != text_marked
        profile = tiny_test_profile(tmp_path / "p.yaml", model={"unseen_note_words": "mark"})
        sft = run_sft(
            profile,
            base_model,
            **_data_kwargs(data),
            out_dir=tmp_path / "sft",
            max_steps=1,
            options=RunOptions(tracking=False),
        )
        assert read_note_vocabulary(sft.model_dir) == note_vocabulary(cases["note"].to_list())

    def test_reward_weights_follow_the_profile(self, data, profile, sft_result, tmp_path):
        import json

        from ecg_r1.training import run_grpo
        from ecg_r1.training.runner import RunOptions

        result = run_grpo(
            profile,
            sft_result.model_dir,
            **_data_kwargs(data),
            out_dir=tmp_path / "g",
            max_steps=1,
            options=RunOptions(tracking=False),
        )
        args = json.loads(
            (tmp_path / "g" / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text()
        )
        assert args["global_step"] == 1
        assert result.run_id is None and result.registered is None
        assert "rewards/grounding_reward/mean" in result.metrics  # weight 0: computed and logged


class TestCLI:
    def test_train_lists_the_stages_in_its_help(self, capsys):
        from ecg_r1.cli import main

        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for stage in ("vision", "warmup", "sft", "grpo", "--max-steps", "--from", "--seed"):
            assert stage in text

    def test_a_start_folder_that_is_not_a_model_is_refused(self, data, tmp_path):
        from ecg_r1.cli import main

        args = [
            "--cohort",
            str(data["cohort"]),
            "--splits",
            str(data["splits"]),
            "--images",
            str(data["images"]),
        ]
        with pytest.raises(SystemExit, match="not a model folder"):
            main(
                [
                    "train",
                    "grpo",
                    *args,
                    "--out",
                    str(tmp_path / "out"),
                    "--from",
                    str(tmp_path),
                    "--no-tracking",
                ]
            )
