"""Training cases: the labelled TWI records of a split, with their prompt, image and findings.

One table feeds every stage. :func:`load_cases` joins the cohort table, the split manifest and
the image index, keeps the labelled TWI records of the requested splits and says loudly what is
missing (a record without an image is an error, never a silent drop). The ``*_dataset``
functions turn the table into the ``datasets.Dataset`` each TRL trainer reads:

* GRPO: a conversational ``prompt`` (:func:`ecg_r1.modeling.prompts.build_prompt`, plain-string content:
  TRL inserts the image placeholder itself), an ``image`` column, and the columns the rewards
  read (``label``, ``twi_leads``) plus ``record_id`` and ``hospital``;
* SFT and the format warm-up: the same ``prompt`` with a ``completion`` (prompt-completion form,
  so the loss covers the completion only and SFT sees exactly the tokens GRPO sees) and an
  ``images`` list.

Images are an ``datasets.Image`` column over the PNG paths: decoded lazily, one at a time, when a
batch is drawn, so a cohort of any size never sits in memory. The processor resizes each page to
the profile's pixel bounds (``image.min_pixels``/``max_pixels``), so a page rendered at another
size still gives the profile's number of image tokens.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from ecg_r1.constants import DEFAULT_SEED
from ecg_r1.data.labels import ISCHEMIC, KNOWN_LABELS, NON_ISCHEMIC
from ecg_r1.data.store import read_cohort
from ecg_r1.modeling.contract import format_target
from ecg_r1.modeling.findings import rationale_from_findings
from ecg_r1.modeling.notes import mark_unseen_words
from ecg_r1.modeling.prompts import build_prompt

if TYPE_CHECKING:
    import datasets

    from ecg_r1.modeling.profiles import Profile

logger = logging.getLogger(__name__)

INDEX_FILE = "index.parquet"
CASE_COLUMNS = (
    "record_id",
    "hospital",
    "split",
    "age",
    "sex",
    "note",
    "twi_leads",
    "label",
    "row",
    "image_path",
)


class TrainingDataError(ValueError):
    """The cohort, splits or images cannot give training cases; the message says what to fix."""


def load_cases(
    cohort_dir: str | Path,
    splits_path: str | Path,
    images_dir: str | Path,
    splits: str | Sequence[str] = "train",
    labelled_only: bool = True,
) -> pl.DataFrame:
    """The TWI cases of some splits, joined with their image paths.

    Args:
        cohort_dir: an ingested cohort folder (``cohort.parquet`` + signals).
        splits_path: the split manifest (``splits.parquet``: record_id, split).
        images_dir: the rendered images' folder (``index.parquet``: record_id, image_path relative
            to the folder).
        splits: one split name or several (``train``, ``val``, ``test_internal``, ``test_external``).
        labelled_only: keep only ischemic / non-ischemic cases (training needs a label; the
            vision pre-training and the format warm-up do not, and may pass False).

    Returns:
        One row a case with :data:`CASE_COLUMNS` (``label`` a bool, null when unlabelled;
        ``image_path`` absolute), in the split manifest's order.

    Raises:
        TrainingDataError: when a file is missing, a split name is unknown, a case has no image,
            or no case is left.
    """
    cohort_dir, splits_path, images_dir = Path(cohort_dir), Path(splits_path), Path(images_dir)
    wanted = [splits] if isinstance(splits, str) else list(splits)
    cohort, chosen, index = _read_tables(cohort_dir, splits_path, images_dir, wanted)
    cases = chosen.join(cohort, on="record_id", how="left", maintain_order="left")
    not_in_cohort = cases.filter(pl.col("row").is_null())["record_id"].to_list()
    if not_in_cohort:
        raise TrainingDataError(
            f"{len(not_in_cohort)} records of {splits_path} are not in {cohort_dir}: {not_in_cohort[:5]}; "
            "the splits and the cohort come from different ingests"
        )
    if "twi" in cases.columns:
        cases = cases.filter(pl.col("twi").fill_null(False))
    if labelled_only:
        cases = cases.filter(pl.col("label").is_in(KNOWN_LABELS))
    cases = cases.join(index, on="record_id", how="left", maintain_order="left")
    no_image = cases.filter(pl.col("image_path").is_null() | (pl.col("image_path") == ""))[
        "record_id"
    ].to_list()
    if no_image:
        raise TrainingDataError(
            f"{len(no_image)} cases of split(s) {wanted} have no image in {images_dir / INDEX_FILE}: "
            f"{no_image[:5]}; render them (`ecg-r1 render`) before training"
        )
    if cases.height == 0:
        raise TrainingDataError(
            f"no {'labelled ' if labelled_only else ''}TWI cases in split(s) {wanted} of {splits_path}"
        )
    root = str(images_dir.resolve())
    return cases.select(
        "record_id",
        "hospital",
        "split",
        "age",
        "sex",
        "note",
        pl.col("twi_leads").fill_null(""),
        pl.when(pl.col("label") == ISCHEMIC)
        .then(True)
        .when(pl.col("label") == NON_ISCHEMIC)
        .then(False)
        .otherwise(None)
        .alias("label"),
        "row",
        (pl.lit(root + "/") + pl.col("image_path")).alias("image_path"),
    )


def _read_tables(
    cohort_dir: Path, splits_path: Path, images_dir: Path, wanted: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The cohort table, the manifest's rows of the wanted splits (``record_id, split``) and the
    image index (``record_id, image_path``), after checking the files and the split names."""
    for path, what in (
        (cohort_dir / "cohort.parquet", "cohort table (run `ecg-r1 ingest`)"),
        (splits_path, "split manifest (run the splits step)"),
        (images_dir / INDEX_FILE, "image index (run `ecg-r1 render`)"),
    ):
        if not path.is_file():
            raise TrainingDataError(f"{path} not found: expected the {what}")
    cohort = read_cohort(cohort_dir)
    manifest = pl.read_parquet(splits_path)
    missing = {"record_id", "split"} - set(manifest.columns)
    if missing:
        raise TrainingDataError(
            f"{splits_path} lacks columns {sorted(missing)}; it must map record_id -> split"
        )
    known = set(manifest["split"].unique().to_list())
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise TrainingDataError(f"split(s) {unknown} not in {splits_path}; it has {sorted(known)}")
    index = pl.read_parquet(images_dir / INDEX_FILE).select("record_id", "image_path")
    chosen = manifest.filter(pl.col("split").is_in(wanted)).select("record_id", "split")
    return cohort, chosen, index


def _image_column(dataset: datasets.Dataset, column: str, as_list: bool) -> datasets.Dataset:
    import datasets

    feature = datasets.Image()
    return dataset.cast_column(column, datasets.List(feature) if as_list else feature)


_WORD_RE = re.compile(r"[^\W\d_]+")


def scramble_note(note: str | None, rng: random.Random) -> str | None:
    """The note with the letters of every word shuffled; digits, units' punctuation and layout kept.

    A note the model cannot read (another hospital's language, abbreviations it never saw) is
    text in words it does not know; a scrambled note is the same for a model trained on this
    cohort's notes, made from the training notes alone (no other hospital's text is used).
    """
    if not note:
        return note
    return _WORD_RE.sub(lambda m: "".join(rng.sample(m.group(0), len(m.group(0)))), note)


@dataclass(frozen=True)
class PromptOptions:
    """How a stage shows its training cases: which notes it hides or scrambles, where the page
    sits, and how unseen note words look (:func:`prompt_options` reads them from a profile).

    Attributes:
        note_dropout: the fraction of cases (drawn with the dataset's seed) whose clinical note is
            replaced by "none given". A model that can answer from the note learns to ignore the
            image; cases without a note make the image carry the answer, which is what it has left
            at a hospital whose notes it cannot read.
        note_scramble: the fraction of (other) cases whose note is scrambled
            (:func:`scramble_note`): they teach that a note in unknown words says nothing, so the
            image decides, where an unfamiliar note would otherwise push every answer one way.
        image_position: where the page sits in the prompt
            (:data:`ecg_r1.modeling.prompts.IMAGE_POSITIONS`).
        unseen_note_words: the profile's ``model.unseen_note_words``. With ``mark`` a scrambled
            case is shown its note with every word marked (``?``), the form inference gives a note
            mostly in words no training note holds (:func:`ecg_r1.modeling.notes.mark_unseen_words`);
            the training notes themselves have no unseen word.
    """

    note_dropout: float = 0.0
    note_scramble: float = 0.0
    image_position: str = "first"
    unseen_note_words: str = "keep"

    def __post_init__(self) -> None:
        fractions = {
            "note_dropout": self.note_dropout,
            "note_scramble": self.note_scramble,
        }
        if not (all(0.0 <= f <= 1.0 for f in fractions.values()) and sum(fractions.values()) <= 1.0):
            named = ", ".join(f"{k} ({v})" for k, v in fractions.items())
            raise ValueError(f"{named} must be fractions in [0, 1] that sum to at most 1")


def _prompts(cases: pl.DataFrame, options: PromptOptions, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    hidden, scrambled = options.note_dropout, options.note_dropout + options.note_scramble
    prompts = []
    for row in cases.iter_rows(named=True):
        # One draw per case whatever the fractions, so the same seed picks the same cases.
        draw = rng.random()
        note = row["note"]
        if draw < hidden:
            note = None
        elif draw < scrambled:
            # A note in unknown words, in the form the model will see one: scrambled letters, or
            # with unseen words marked, every word marked.
            note = (
                mark_unseen_words(note, frozenset())
                if options.unseen_note_words == "mark"
                else scramble_note(note, rng)
            )
        prompts.append(build_prompt(row["age"], row["sex"], note, options.image_position))
    return prompts


def grpo_dataset(
    cases: pl.DataFrame, options: PromptOptions = PromptOptions(), seed: int = DEFAULT_SEED
) -> datasets.Dataset:
    """The GRPO dataset: ``prompt``, ``image`` and the reward columns.

    Args:
        cases: from :func:`load_cases`.
        options: how the cases are shown (:class:`PromptOptions`).
        seed: which cases lose or scramble their note (the same cases as
            :func:`sft_dataset` with the same seed).

    Returns:
        A ``datasets.Dataset`` with ``prompt``, ``image`` (decoded lazily), ``label`` (bool),
        ``twi_leads``, ``record_id``, ``hospital``.
    """
    import datasets

    data = datasets.Dataset.from_dict(
        {
            "prompt": _prompts(cases, options, seed),
            "image": cases["image_path"].to_list(),
            "label": cases["label"].to_list(),
            "twi_leads": cases["twi_leads"].to_list(),
            "record_id": cases["record_id"].to_list(),
            "hospital": cases["hospital"].to_list(),
        }
    )
    return _image_column(data, "image", as_list=False)


def sft_targets(
    cases: pl.DataFrame,
    rationale: bool,
    answers: Iterable[bool | None] | None = None,
    findings: pl.DataFrame | None = None,
) -> list[str]:
    """The completion each case is trained to write.

    Args:
        cases: from :func:`load_cases`.
        rationale: put a reasoning built from the case's known or measured findings
            (:func:`ecg_r1.modeling.findings.rationale_from_findings`: leads with TWI and their territory;
            never the label) in the think block; else leave it empty.
        answers: the answer to write per case; default the case's label.
        findings: measured ECG features, one row per case in the same order
            (:func:`case_findings`); with ``rationale`` the reasoning then also states rate, T
            depth and symmetry, ST, QRS width and voltage, so the model writes what it reads off
            the page before it answers.

    Returns:
        One target string per case, each accepted by :func:`ecg_r1.modeling.contract.parse_completion`.

    Raises:
        TrainingDataError: when a case has no answer (unlabelled and none given).
    """
    answers = list(answers) if answers is not None else cases["label"].to_list()
    if findings is not None and findings.height != cases.height:
        raise ValueError(f"{findings.height} findings rows for {cases.height} cases; pass one per case")
    rows = findings.iter_rows(named=True) if findings is not None else (None for _ in range(cases.height))
    targets = []
    for row, answer, measured in zip(cases.iter_rows(named=True), answers, rows, strict=True):
        if answer is None:
            raise TrainingDataError(f"case {row['record_id']} has no label to train on; use labelled cases")
        think = rationale_from_findings(row["twi_leads"], measured) if rationale else None
        targets.append(format_target(bool(answer), think))
    return targets


def case_findings(cases: pl.DataFrame, cohort_dir: str | Path) -> pl.DataFrame:
    """The ECG features measured from each case's raw signal (:mod:`ecg_r1.data.features`), one row
    per case in ``cases``' order: the findings a findings rationale states. No label is read."""
    from ecg_r1.data.features import FEATURE_COLUMNS, with_features
    from ecg_r1.data.store import open_signals

    measured = with_features(cases.select("record_id", "row"), open_signals(cohort_dir))
    return measured.select("record_id", *FEATURE_COLUMNS)


def sft_dataset(
    cases: pl.DataFrame,
    targets: Sequence[str],
    options: PromptOptions = PromptOptions(),
    seed: int = DEFAULT_SEED,
) -> datasets.Dataset:
    """The SFT dataset in TRL's prompt-completion form with one image per case.

    Args:
        cases: from :func:`load_cases`.
        targets: one completion per case (:func:`sft_targets`).
        options: how the cases are shown (:class:`PromptOptions`).
        seed: which cases lose or scramble their note.

    Returns:
        A ``datasets.Dataset`` with ``prompt``, ``completion`` (one assistant message),
        ``images`` (a one-image list, decoded lazily), ``label``, ``record_id``.
    """
    import datasets

    if len(targets) != cases.height:
        raise ValueError(f"{len(targets)} targets for {cases.height} cases; pass one per case")
    data = datasets.Dataset.from_dict(
        {
            "prompt": _prompts(cases, options, seed),
            "completion": [[{"role": "assistant", "content": target}] for target in targets],
            "images": [[path] for path in cases["image_path"].to_list()],
            "label": cases["label"].to_list(),
            "record_id": cases["record_id"].to_list(),
        }
    )
    return _image_column(data, "images", as_list=True)


def random_answers(n: int, seed: int) -> list[bool]:
    """Answers drawn at random (fair coin), for the label-free format warm-up."""
    rng = random.Random(seed)
    return [rng.random() < 0.5 for _ in range(n)]


def data_summary(cases: pl.DataFrame) -> dict[str, Any]:
    """Counts worth logging with a run: cases, ischemic share, per hospital."""
    labelled = cases.filter(pl.col("label").is_not_null())
    return {
        "cases": cases.height,
        "ischemic_share": round(float(labelled["label"].mean()), 4) if labelled.height else None,
        "hospitals": ",".join(sorted(str(h) for h in cases["hospital"].unique().to_list())),
    }


def prompt_options(profile: Profile, stage: str) -> PromptOptions:
    """How a stage shows its training cases: the stage's ``note_dropout`` and ``note_scramble``
    and the profile's ``image.position`` and ``model.unseen_note_words``."""
    settings = profile.stage_settings(stage)
    return PromptOptions(
        **{key: float(settings[key]) for key in ("note_dropout", "note_scramble")},
        image_position=profile.image_position,
        unseen_note_words=profile.unseen_note_words,
    )


def case_examples(cases: pl.DataFrame) -> list[dict[str, Any]]:
    """The cases as inference examples (:mod:`ecg_r1.modeling.inference`): each page opened as an
    RGB image, with the case's age, sex and note as written."""
    from PIL import Image

    examples = []
    for row in cases.select("image_path", "age", "sex", "note").iter_rows(named=True):
        with Image.open(row["image_path"]) as image:
            examples.append({**row, "image": image.convert("RGB")})
    return examples


def findings_rationale(profile: Profile) -> bool:
    """Whether the profile's SFT targets state the measured findings (``stages.sft.rationale_findings``,
    only with ``model.sft_rationale`` on)."""
    return profile.sft_rationale and bool(profile.stage_settings("sft")["rationale_findings"])


def validation_cases(
    cohort_dir: str | Path, splits_path: str | Path, images_dir: str | Path
) -> pl.DataFrame | None:
    """The validation split's cases (for the sample completions a stage logs), or None when the
    cohort has none: samples are a nicety, and a cohort without a validation split still trains."""
    try:
        return load_cases(cohort_dir, splits_path, images_dir, "val")
    except TrainingDataError as error:
        logger.info("no validation cases for sample completions: %s", error)
        return None
