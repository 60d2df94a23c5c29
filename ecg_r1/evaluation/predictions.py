"""The models' answers: a model folder's greedy completions, parsed, with P(Yes), on any cases.

Takes: model folders or training stage folders, a profile and a cases table
(:mod:`ecg_r1.evaluation.cases`). Gives: :class:`ecg_r1.evaluation.evaluate.Predictions` per
model (:func:`predict_cases`, also with an input taken away: :data:`ABLATIONS`) and, for
:func:`ecg_r1.evaluation.comparison.run_comparison`, every model's and ablation's answers written
to ``predictions/<row>.parquet`` (:func:`predict_models`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ecg_r1.constants import PREDICTION_BATCH_SIZE
from ecg_r1.evaluation.cases import ENGLISH_NOTE_COLUMN
from ecg_r1.evaluation.evaluate import Predictions
from ecg_r1.evaluation.outputs import predictions_key, write_predictions

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

# Input ablations: what the model is shown instead -> the row-name suffix. "image": the ECG page
# with flat traces (grid, labels and calibration pulse kept, no ECG); "note": no clinical note
# ("none given"). A model whose accuracy does not drop without the ECG is reading the note only.
# "english_note" (simulated cohorts only): each note of a hospital that writes in another language
# replaced by the same findings written in English (the simulator truth's ``note_english``),
# answered on the splits holding such a note: what the held-out hospital's language costs.
ABLATIONS: dict[str, str] = {"image": "no ECG", "note": "no note", "english_note": "note in English"}
ENGLISH_NOTE = "english_note"
INPUTS_TAKEN_AWAY = tuple(key for key in ABLATIONS if key != ENGLISH_NOTE)  # what predict_cases removes
RESULT_FILE = "result.json"  # a training stage's StageResult (ecg_r1.training.stages)


def predict_cases(
    model_dir: str | Path,
    profile: Any,
    cases: pl.DataFrame,
    batch_size: int = PREDICTION_BATCH_SIZE,
    max_new_tokens: int | None = None,
    name: str | None = None,
    progress: bool = False,
    ablation: str | None = None,
) -> tuple[Predictions, list[str]]:
    """A model's answers on the cases: greedy completion, strict parse, P(Yes) at the answer.

    Images are opened a batch at a time, so a split of any size never sits in memory.

    Args:
        model_dir: a model folder (:func:`ecg_r1.modeling.models.load_model_and_processor`).
        profile: the model's profile (a :class:`ecg_r1.modeling.profiles.Profile` or its name / path).
        cases: ``record_id``, ``image_path``, ``age``, ``sex``, ``note`` per case.
        batch_size: examples per forward pass.
        max_new_tokens: completion cap; None: the profile's GRPO ``max_completion_length``.
        name: the row name (default: the folder name).
        progress: show a tqdm progress bar.
        ablation: None, or the input taken away: ``"image"`` shows every case the same page with
            flat traces instead of its ECG, ``"note"`` shows no clinical note. (The
            ``"english_note"`` rows are answers on :func:`english_note_cases`, with none taken away.)

    Returns:
        ``(predictions, completions)``: answers (None where the completion broke the output
        contract, which the evaluation counts as wrong), P(Yes) for every case, and as reasoning
        the think block of a valid completion or the raw text of an invalid one; and the raw
        completions in case order.
    """
    from ecg_r1.modeling.device import resolve_device
    from ecg_r1.modeling.inference import generate_and_score
    from ecg_r1.modeling.models import load_model_and_processor
    from ecg_r1.modeling.profiles import Profile, load_profile

    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    if ablation is not None and ablation not in INPUTS_TAKEN_AWAY:
        raise ValueError(
            f"predict_cases takes away one of {', '.join(INPUTS_TAKEN_AWAY)}, not {ablation!r}; for english_note "
            "pass english_note_cases(cases) with no ablation"
        )
    if max_new_tokens is None:
        max_new_tokens = profile.max_completion_length
    model, processor = load_model_and_processor(model_dir, profile, device=resolve_device(profile))
    completions: list[str] = []
    p_yes = np.empty(cases.height, dtype=np.float64)
    blank_page = _blank_page(profile) if ablation == "image" else None
    starts = range(0, cases.height, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"predict {name or Path(model_dir).name}", unit="batch")
    for start in starts:
        examples = _shown_examples(cases.slice(start, batch_size), ablation, blank_page)
        texts, p_yes[start : start + len(examples)] = generate_and_score(
            model, processor, examples, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        completions.extend(texts)
    return _parsed_predictions(name or Path(model_dir).name, name or model_dir, cases, completions, p_yes)


def _blank_page(profile: Any) -> Image.Image:
    """The page every case is shown under the ``image`` ablation: the profile's page with flat
    traces (grid, labels and calibration pulse kept, no ECG), in RGB."""
    from ecg_r1.data.canonical import LEADS, N_SAMPLES
    from ecg_r1.imaging.draw import render_page

    blank_page = render_page(np.zeros((len(LEADS), N_SAMPLES), np.float32), profile.render_config())
    return blank_page.convert("RGB")


def _shown_examples(
    batch: pl.DataFrame, ablation: str | None, blank_page: Image.Image | None
) -> list[dict[str, Any]]:
    """A batch of cases as the model is shown them: each with its page or, given ``blank_page``,
    that one (none opened), and without its note under the ``note`` ablation."""
    from ecg_r1.training.data import case_examples

    if blank_page is not None:  # every page the same blank one: none is opened
        rows = batch.select("image_path", "age", "sex", "note").to_dicts()
        examples = [{**row, "image": blank_page} for row in rows]
    else:
        examples = case_examples(batch)
    if ablation == "note":
        examples = [{**example, "note": None} for example in examples]
    return examples


def _parsed_predictions(
    name: str, log_name: Any, cases: pl.DataFrame, completions: list[str], p_yes: np.ndarray
) -> tuple[Predictions, list[str]]:
    """The completions parsed by the output contract into the row ``name``'s predictions (the
    count of invalid ones logged under ``log_name``), with the completions."""
    from ecg_r1.modeling.contract import parse_completion

    parsed = [parse_completion(text) for text in completions]
    invalid = sum(not p.valid for p in parsed)
    logger.info("%s: %d of %d completions invalid", log_name, invalid, len(parsed))
    predictions = Predictions(
        name=name,
        record_id=cases["record_id"].to_list(),
        y_pred=[p.answer for p in parsed],
        p_yes=p_yes,
        reasoning=[p.think if p.valid else text for p, text in zip(parsed, completions, strict=True)],
    )
    return predictions, completions


def english_note_cases(cases: pl.DataFrame) -> pl.DataFrame:
    """The cases of every split that holds a note not in English, each shown its English note.

    Args:
        cases: with ``split``, ``note`` and :data:`ENGLISH_NOTE_COLUMN` (the simulator truth's
            note in English; null where unknown, and then the note is kept).

    Returns:
        Those splits' cases, whole (a split's row covers all its cases), ``note`` replaced; no
        case when every note is already in English.

    Raises:
        ValueError: without :data:`ENGLISH_NOTE_COLUMN` (the cohort is not simulated).
    """
    if ENGLISH_NOTE_COLUMN not in cases.columns:
        raise ValueError(
            "the english_note ablation needs the simulator truth's note_english column (--truth of a "
            "simulated cohort); drop the ablation for other cohorts"
        )
    english = pl.col(ENGLISH_NOTE_COLUMN).fill_null(pl.col("note"))
    differs = cases.filter(english.ne_missing(pl.col("note")))["split"].unique()
    return cases.filter(pl.col("split").is_in(differs.implode())).with_columns(english.alias("note"))


def stage_folder(path: str | Path) -> tuple[Path, Path | None]:
    """The model folder and the training stage folder (holding ``result.json``) of a path.

    Accepts a stage folder (``result.json`` + ``model/``), a model folder inside one, or a bare
    model folder (no stage: no reward curves, no registered version).

    Raises:
        ValueError: when the path holds no model.
    """
    path = Path(path)
    if (path / RESULT_FILE).is_file():
        from ecg_r1.training.stage_folder import read_result

        result = read_result(path)
        model_dir = Path(result.model_dir) if result and Path(result.model_dir).is_dir() else path / "model"
        return model_dir, path
    if (path / "config.json").is_file():
        return path, path.parent if (path.parent / RESULT_FILE).is_file() else None
    raise ValueError(
        f"{path} is neither a model folder (config.json) nor a training stage folder (result.json + model/); "
        "train the model first or pass the folder a stage wrote"
    )


@dataclass(frozen=True)
class ModelAnswers:
    """What :func:`predict_models` gives.

    Attributes:
        predictions: row name -> answers, the models in the given order, each followed by its ablations.
        ablated: ablated row -> (model row, ablation key of :data:`ABLATIONS`).
        files: :func:`ecg_r1.evaluation.outputs.predictions_key` -> the written predictions file.
    """

    predictions: dict[str, Predictions]
    ablated: dict[str, tuple[str, str]]
    files: dict[str, Path]


def predict_models(
    model_dirs: Mapping[str, Path],
    profile: Any,
    cases: pl.DataFrame,
    out_dir: str | Path,
    ablations: Sequence[str] = (),
    batch_size: int = PREDICTION_BATCH_SIZE,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> ModelAnswers:
    """Every model's answers on all the cases, in one pass each, and again per ablation.

    Row ``"<name>"`` is the model as trained, ``"<name> (no ECG)"`` / ``"<name> (no note)"`` the
    same model with that input taken away, ``"<name> (note in English)"`` on the splits with a
    note in another language (left out where there is none). Each row's answers, split and raw
    completions are written to ``predictions/<row>.parquet`` under ``out_dir``.

    Args:
        model_dirs: row name -> model folder, in table order.
        profile: the models' profile (see :func:`predict_cases`).
        cases: the cases (:attr:`ecg_r1.evaluation.cases.EvaluationCases.cases`).
        out_dir: the comparison's folder (its ``predictions/`` exists).
        ablations: keys of :data:`ABLATIONS`.
        batch_size, max_new_tokens, progress: as in :func:`predict_cases`.
    """
    predictions: dict[str, Predictions] = {}
    ablated: dict[str, tuple[str, str]] = {}
    files: dict[str, Path] = {}
    english_cases = english_note_cases(cases) if ENGLISH_NOTE in ablations else None
    for name, model_dir in model_dirs.items():
        for ablation in (None, *ablations):
            row = name if ablation is None else f"{name} ({ABLATIONS[ablation]})"
            shown = english_cases if ablation == ENGLISH_NOTE else cases
            if shown.height == 0:
                logger.info("%s left out: every evaluated note is already in English", row)
                continue
            preds, completions = predict_cases(
                model_dir,
                profile,
                shown,
                batch_size,
                max_new_tokens,
                name=row,
                progress=progress,
                ablation=None if ablation == ENGLISH_NOTE else ablation,
            )
            predictions[row] = preds
            if ablation is not None:
                ablated[row] = (name, ablation)
            frame = preds.to_frame().with_columns(
                split=shown["split"], completion=pl.Series(completions, dtype=pl.String)
            )
            files[predictions_key(row)] = write_predictions(out_dir, row, frame)
    return ModelAnswers(predictions, ablated, files)
