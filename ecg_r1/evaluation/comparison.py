"""The model comparison: every model and reference row on the internal and cross-hospital test splits.

:func:`run_comparison` is the whole evaluation behind ``ecg-r1 evaluate`` and the Dagster
``model_comparison`` asset. Takes: model (or training stage) folders, their profile, the cohort
with its split manifest and rendered images, and optionally the simulator's truth and a
real-record folder. Gives: a :class:`~ecg_r1.evaluation.results.Comparison` and these files under
``out_dir``::

    comparison.md                 the table (internal and cross-hospital), the note words no
                                  training note holds, and the paired comparisons
    metrics.json                  every figure: rows x splits (with their note shift), per
                                  hospital, paired, files
    cases.parquet                 the evaluated cases (record_id, split, hospital, label)
    predictions/<row>.parquet     each row's answers (models: also reasoning and raw completion)
    plots/*.png                   confusion matrices, ROC per split, accuracy per hospital,
                                  reward curves per trained stage, cases with the model's reasoning

It reads as the pipeline it runs, one step per module of :mod:`ecg_r1.evaluation`:

1. the labelled TWI cases of ``test_internal`` and ``test_external`` (the held-out hospitals) and,
   given a real-record folder, of real records no model was trained on (:mod:`.cases`);
2. each model's answers and those of its input ablations: greedy generation, the strict parser,
   P(Yes) at the answer position (:mod:`.predictions`);
3. the reference rows: majority class, the feature baseline and, on the simulated cohort, the
   Bayes ceiling (:mod:`.references`);
4. every row evaluated (n, 95 % bootstrap intervals, per hospital) and paired (:mod:`.results`,
   the statistics of :mod:`.evaluate`);
5. the table (with the cited clinicians, :mod:`.report`), the plots (:mod:`.figures`) and
   ``metrics.json`` (:mod:`.outputs`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from ecg_r1.constants import DEFAULT_SEED, N_BOOT, PREDICTION_BATCH_SIZE
from ecg_r1.evaluation import report
from ecg_r1.evaluation.baselines import CLINICIANS_NAME, CLINICIANS_SOURCE, clinicians_metrics
from ecg_r1.evaluation.cases import (
    EVAL_SPLITS,
    EvaluationCases,
    gather_cases,
    has_english_notes,
    with_english_notes,
)
from ecg_r1.evaluation.evaluate import BinaryMetrics, Predictions
from ecg_r1.evaluation.figures import write_plots
from ecg_r1.evaluation.outputs import (
    METRICS_FILE,
    PLOTS_DIR,
    PREDICTIONS_DIR,
    TABLE_FILE,
    write_cases,
    write_metrics,
)
from ecg_r1.evaluation.predictions import (
    ABLATIONS,
    ENGLISH_NOTE,
    ModelAnswers,
    predict_models,
    stage_folder,
)
from ecg_r1.evaluation.real_records import REAL_SPLIT
from ecg_r1.evaluation.references import answer_references
from ecg_r1.evaluation.report import SPLIT_TITLES
from ecg_r1.evaluation.results import (
    Comparison,
    PairedRecord,
    evaluate_rows,
    metrics_document,
    pair_rows,
    split_counts,
)

if TYPE_CHECKING:
    from ecg_r1.modeling.profiles import Profile

logger = logging.getLogger(__name__)


def covering_truth(truth_path: str | Path, splits_path: str | Path) -> Path | None:
    """The simulator's truth table when it exists and knows every record of the split manifest,
    else None: after real data is ingested the truth describes another cohort, and the comparison
    has no Bayes ceiling row (logged)."""
    truth = Path(truth_path)
    if truth.is_file():
        known = set(pl.read_parquet(truth, columns=["record_id"])["record_id"].to_list())
        wanted = pl.read_parquet(splits_path, columns=["record_id"])["record_id"].to_list()
        if all(record in known for record in wanted):
            return truth
    logger.info("no simulator truth for these cases: the table has no Bayes ceiling row")
    return None


def possible_ablations(ablations: Sequence[str], truth_path: str | Path | None) -> list[str]:
    """``ablations`` less ``english_note`` where the truth table (if any) has no English notes
    (logged): the rows a comparison of this cohort can have."""
    if ENGLISH_NOTE in ablations and not has_english_notes(truth_path):
        logger.info("no note-in-English rows: the cohort's simulator truth has no English notes")
        return [a for a in ablations if a != ENGLISH_NOTE]
    return list(ablations)


@dataclass(frozen=True)
class ComparisonInputs:
    """What a comparison reads.

    Attributes:
        cohort_dir, splits_path, images_dir: the cohort, split manifest and rendered images.
        truth_path: the simulator's ``truth.parquet`` for the Bayes ceiling; None on real data.
        baselines_dir: fitted reference baselines
            (:meth:`ecg_r1.evaluation.references.ReferenceBaselines.save`); None fits them here on
            the training split.
        real_records: a folder :func:`ecg_r1.evaluation.real_records.prepare_real_records` wrote; its cases
            (less any also in the main cohort, see :func:`ecg_r1.evaluation.cases.real_record_cases`)
            become a third split, :data:`~ecg_r1.evaluation.real_records.REAL_SPLIT`, titled "real
            records (sim-to-real)", with the models, their ablations, majority class and feature
            baseline (fitted on the training split) and the paired comparisons. None: no such section.
    """

    cohort_dir: str | Path
    splits_path: str | Path
    images_dir: str | Path
    truth_path: str | Path | None = None
    baselines_dir: str | Path | None = None
    real_records: str | Path | None = None


@dataclass(frozen=True)
class ComparisonSettings:
    """How a comparison runs: the one source of its defaults (the CLI and the Dagster config
    take theirs from the same constants).

    Attributes:
        seed: seeds the bootstrap, the feature baseline and the cases shown.
        pairs: ``(a, b)`` row names to compare on the same cases; None: every pair of models.
        n_boot: bootstrap resamples per interval.
        batch_size: examples per forward pass.
        max_new_tokens: completion cap; None: the profile's.
        n_case_figures: cases shown beside the first model's reasoning (0: no cases figure).
        max_cases_per_split: evaluate a seeded random sample of at most this many cases per split
            (None: all). For time-boxed runs on a CPU; the table's n says how many were used.
        progress: tqdm progress bars while the models answer.
        ablations: keys of :data:`ecg_r1.evaluation.predictions.ABLATIONS`; each model is also
            evaluated with that input taken away (row ``"<name> (no ECG)"`` / ``"<name> (no note)"``),
            or, with ``english_note`` (needs the inputs' ``truth_path``), with the notes of a
            hospital writing in another language replaced by the same findings in English, on the
            splits holding such notes (``"<name> (note in English)"``); each paired with the model
            itself.
    """

    seed: int = DEFAULT_SEED
    pairs: Sequence[tuple[str, str]] | None = None
    n_boot: int = N_BOOT
    batch_size: int = PREDICTION_BATCH_SIZE
    max_new_tokens: int | None = None
    n_case_figures: int = 4
    max_cases_per_split: int | None = None
    progress: bool = False
    ablations: Sequence[str] = ()


def run_comparison(
    models: Mapping[str, str | Path],
    profile: Any,
    inputs: ComparisonInputs,
    out_dir: str | Path,
    settings: ComparisonSettings = ComparisonSettings(),
) -> Comparison:
    """Evaluate models and reference rows on the internal and cross-hospital test splits, and
    optionally on real records (a sim-to-real check).

    Args:
        models: row name -> model folder or training stage folder (``result.json`` + ``model/``),
            in table order (e.g. ``{"GRPO": ..., "GRPO from SFT": ..., "SFT": ...}``).
        profile: the models' profile (name, path or :class:`ecg_r1.modeling.profiles.Profile`).
        inputs: the cohort, its split manifest and images, and the optional truth, fitted
            baselines and real records (:class:`ComparisonInputs`).
        out_dir: where the table, metrics, predictions and plots go (created).
        settings: seed, pairs, bootstrap, batching and ablations (:class:`ComparisonSettings`).

    Returns:
        A :class:`ecg_r1.evaluation.results.Comparison` with the written files.

    Raises:
        ValueError: with no model, an unknown row in ``pairs``, a truth table missing cases, the
            english_note ablation without a truth table that has English notes, or real records
            that are all in the main cohort.
        FileNotFoundError: when ``inputs.real_records`` is not a prepared real-record folder.
        ecg_r1.training.data.TrainingDataError: when the data cannot give test cases.
    """
    profile, out = _prepare(models, profile, out_dir, settings.ablations)
    data = gather_cases(
        inputs.cohort_dir,
        inputs.splits_path,
        inputs.images_dir,
        settings.seed,
        settings.max_cases_per_split,
        inputs.real_records,
    )
    files: dict[str, Path] = {"cases": write_cases(out, data.cases)}
    folders = {name: stage_folder(path) for name, path in models.items()}
    model_dirs = {name: model_dir for name, (model_dir, _) in folders.items()}
    answers, references, reference_files = _answer_rows(model_dirs, profile, data, inputs, out, settings)
    files |= answers.files | reference_files
    predictions = answers.predictions | {preds.name: preds for preds in references}
    kinds = {name: report.MEASURED for name in answers.predictions}
    kinds |= {preds.name: report.REFERENCE for preds in references}

    # Metrics per row and split (the splits a row answered) and per hospital; pairs on the same cases.
    results, per_hospital = evaluate_rows(
        predictions, data.by_split, data.simulated, settings.n_boot, settings.seed
    )
    to_pair = _pairs(list(models), settings.pairs, answers.ablated)
    paired = pair_rows(to_pair, predictions, results, data.by_split, settings.n_boot, settings.seed)

    # What people read: the table, the plots and every figure in metrics.json.
    table = _table(data, results, kinds, paired)
    files["table"] = out / TABLE_FILE
    files["table"].write_text(table)
    comparison = Comparison(
        out_dir=out,
        table=table,
        models=model_dirs,
        stages={name: stage for name, (_, stage) in folders.items()},
        results=results,
        kinds=kinds,
        per_hospital=per_hospital,
        paired=paired,
        predictions=predictions,
        files=files,
        real_records=data.real_records,
        note_shift=data.note_shift,
        cases=data.cases.select("record_id", "split", "hospital", "label"),
        ablated=answers.ablated,
        data_splits=split_counts(inputs.splits_path),
        profile=profile,
        simulated=inputs.truth_path is not None,
    )
    _write_figures(comparison, data, settings)
    return comparison


def _prepare(
    models: Mapping[str, str | Path], profile: Any, out_dir: str | Path, ablations: Sequence[str]
) -> tuple[Profile, Path]:
    """The request checked (a model, known ablations), the profile loaded and the output folder
    with its ``predictions/`` and ``plots/`` made."""
    from ecg_r1.modeling.profiles import Profile, load_profile

    if not models:
        raise ValueError("no models to compare: pass at least one name -> model folder")
    if unknown_ablations := [a for a in ablations if a not in ABLATIONS]:
        raise ValueError(f"unknown ablations {unknown_ablations}; choose from {sorted(ABLATIONS)}")
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    out = Path(out_dir)
    (out / PREDICTIONS_DIR).mkdir(parents=True, exist_ok=True)
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    return profile, out


def _answer_rows(
    model_dirs: Mapping[str, Path],
    profile: Any,
    data: EvaluationCases,
    inputs: ComparisonInputs,
    out: Path,
    settings: ComparisonSettings,
) -> tuple[ModelAnswers, list[Predictions], dict[str, Path]]:
    """Each model's and its ablations' answers, then the reference rows' answers and files: one
    answer per row and case, each row's answers written under ``out``."""
    ablations = settings.ablations
    shown = with_english_notes(data.cases, inputs.truth_path) if ENGLISH_NOTE in ablations else data.cases
    answers = predict_models(
        model_dirs,
        profile,
        shown,
        out,
        ablations,
        settings.batch_size,
        settings.max_new_tokens,
        settings.progress,
    )
    references, reference_files = answer_references(
        data,
        out,
        inputs.cohort_dir,
        inputs.splits_path,
        inputs.images_dir,
        inputs.truth_path,
        inputs.baselines_dir,
        settings.seed,
    )
    return answers, references, reference_files


def _write_figures(comparison: Comparison, data: EvaluationCases, settings: ComparisonSettings) -> None:
    """The plots and ``metrics.json`` (which lists every written file, itself included), added to
    ``comparison.files``."""
    files = comparison.files
    files |= write_plots(
        comparison, data.by_split, comparison.ablated, settings.n_case_figures, settings.seed
    )
    files["metrics"] = (
        comparison.out_dir / METRICS_FILE
    )  # before the document: it lists itself among the files
    profile = comparison.profile
    document = metrics_document(comparison, data.by_split) | {"profile": str(profile.path or profile.name)}
    write_metrics(files["metrics"], document)


def _pairs(
    models: Sequence[str], pairs: Sequence[tuple[str, str]] | None, ablated: Mapping[str, tuple[str, str]]
) -> list[tuple[str, str]]:
    """The rows to pair: the given pairs (None: every pair of models), then each model against
    itself without an input (how much of its accuracy that input carries)."""
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1 :]]
    return [*pairs, *((name, row) for row, (name, _) in ablated.items())]


def _table(
    data: EvaluationCases,
    results: Mapping[str, Mapping[str, BinaryMetrics]],
    kinds: Mapping[str, str],
    paired: Sequence[PairedRecord],
) -> str:
    """``comparison.md``: per split, models then reference rows, then the cited clinicians (whose
    figure is about the paper's hospitals, so it is not repeated under the real records); the
    real-record note, the note words each split holds that no training note does, and the paired
    comparisons."""
    rows = []
    for split in data.by_split:
        for name, by_split in results.items():
            if split in by_split:
                rows.append(report.TableRow(name, SPLIT_TITLES[split], by_split[split], kinds[name]))
        if split in EVAL_SPLITS:
            rows.append(
                report.TableRow(
                    CLINICIANS_NAME,
                    SPLIT_TITLES[split],
                    clinicians_metrics(),
                    report.CITED,
                    CLINICIANS_SOURCE,
                )
            )
    table = "# Model comparison\n\n" + report.comparison_table(rows)
    if data.real_records is not None:
        table += report.real_records_markdown(data.real_records, data.by_split[REAL_SPLIT])
    return table + report.note_shift_markdown(data.note_shift) + report.paired_markdown(paired)
