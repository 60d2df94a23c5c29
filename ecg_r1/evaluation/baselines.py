"""Reference rows for every comparison: majority class, a feature model, clinicians, the Bayes ceiling.

* :class:`MajorityBaseline`: always answers the class most frequent in the training split.
* :class:`FeatureBaseline`: what a practitioner would try first. scikit-learn's
  ``HistGradientBoostingClassifier`` on the measured ECG features of
  :func:`ecg_r1.data.features.measure_features` (heart rate, QRS and QT; per lead T amplitude and
  symmetry, ST level at J + 60 ms, QRS voltage; the number of leads with measured TWI, and per
  coronary territory the number of inverted leads and the deepest T wave) plus the
  clinical fields: age, sex and the note. **The note** enters as binary word and word-pair
  presence flags (``CountVectorizer(binary=True, ngram_range=(1, 2))``), the
  :data:`NOTE_VOCABULARY` most frequent ones in the training notes seen in at least
  :data:`NOTE_MIN_DF` notes. Flags rather than TF-IDF + SVD because a tree splits on
  "troponin raised" or "no chest pain" directly, the pairs keep the negations, and the learnt
  vocabulary works for any hospital's language without a hand-made keyword list (a hospital
  writing in another language than the training notes gets no text signal, which is the honest
  cross-hospital result). Missing values stay missing (gradient boosting handles NaN natively).
* :func:`clinicians_metrics`: the clinicians' ~50 % **cited from the ECG-R1 paper, not measured
  here**. The paper (quoting historical literature) gives it as the positive predictive value of
  clinicians' visual reading of isolated TWI, so the row carries it as PPV (:data:`CLINICIANS_PPV`);
  :data:`CLINICIANS_ACCURACY` is the same number kept as the 50 % reference line for plots.
* :func:`bayes_ceiling`: on the simulated cohort, the answer of the Bayes-optimal classifier,
  which knows the true generative model (``truth.parquet`` column ``posterior_ischemic``):
  predict ischemic when the posterior is at least 0.5. No model can do better on average.

Each baseline yields :class:`ecg_r1.evaluation.evaluate.Predictions` (answer and score per case), so the same
:mod:`ecg_r1.evaluation.evaluate` functions produce its row.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from ecg_r1.constants import DEFAULT_SEED
from ecg_r1.data.features import FEATURE_COLUMNS, TWI_THRESHOLD_MV
from ecg_r1.data.labels import KNOWN_LABELS
from ecg_r1.evaluation.evaluate import BinaryMetrics, Estimate, Predictions, labels_to_truth

log = logging.getLogger(__name__)

# What the ECG-R1 paper says, verbatim from its abstract: "Historical clinical literature reports
# that clinician-led visual interpretation of isolated TWI yields a positive predictive value of
# only approximately 50%". The cited figure is a PPV, so the clinicians' row shows it as a PPV.
CLINICIANS_PPV: float = 0.50
# The brief's name for the same ~50 % reference (a reference line in plots). It is NOT a measured
# or reported accuracy: see CLINICIANS_PPV.
CLINICIANS_ACCURACY: float = CLINICIANS_PPV
CLINICIANS_SOURCE: str = (
    "ECG-R1 paper (Differentiating Ischemic From Nonischemic T-Wave Inversion Using a Multimodal "
    "Vision-Language Model With Reinforcement Learning, JMIR Med Inform 2026;14:e87227, "
    "doi:10.2196/87227), quoting historical literature: clinicians' visual reading of isolated TWI has a "
    "positive predictive value of about 50 %; cited, not measured in this project"
)
CLINICIANS_NAME = "Clinicians (cited, not measured)"

NOTE_VOCABULARY: int = 300
# The feature baseline's gradient boosting: rounds and learning rate (also the Dagster config's defaults).
BOOST_MAX_ITER: int = 300
BOOST_LEARNING_RATE: float = 0.05
# Cohort columns the feature baseline is fitted from besides the measured features.
TRAINING_FIELDS: tuple[str, ...] = ("age", "sex", "note", "label")
# Parquet metadata key holding a saved baseline's parameters.
SAVED_PARAMS_KEY = b"ecg_r1.feature_baseline"
NOTE_MIN_DF: int = 3
POSTERIOR_COLUMNS: tuple[str, ...] = ("posterior_ischemic", "posterior")
MEASURED_COLUMNS: tuple[str, ...] = (*FEATURE_COLUMNS, "n_twi_leads")
CLINICAL_NUMERIC: tuple[str, ...] = ("age", "sex_male")
# Coronary territories: a reader judges TWI by the contiguous leads it spans, so the baseline gets
# per territory the number of inverted leads and the deepest T wave.
TERRITORIES: dict[str, tuple[str, ...]] = {
    "anterior": ("V1", "V2", "V3", "V4"),
    "inferior": ("II", "III", "aVF"),
    "lateral": ("I", "aVL", "V5", "V6"),
}
TERRITORY_COLUMNS: tuple[str, ...] = tuple(
    f"{kind}_{name}" for name in TERRITORIES for kind in ("n_twi", "min_t")
)


def note_vectorizer() -> CountVectorizer:
    """The note's word and word-pair presence flags the feature baseline reads (unfitted).

    The :data:`NOTE_VOCABULARY` most frequent words and pairs of the training notes seen in at
    least :data:`NOTE_MIN_DF` of them; also the note reader of the research probe
    (``research/probe.py``).
    """
    return CountVectorizer(binary=True, ngram_range=(1, 2), min_df=NOTE_MIN_DF, max_features=NOTE_VOCABULARY)


def boosted_classifier(
    seed: int = DEFAULT_SEED, max_iter: int = BOOST_MAX_ITER, learning_rate: float = BOOST_LEARNING_RATE
) -> HistGradientBoostingClassifier:
    """The feature baseline's gradient-boosting classifier (unfitted); the research probe's boosted
    reader reuses it."""
    return HistGradientBoostingClassifier(
        max_iter=max_iter,
        learning_rate=learning_rate,
        max_leaf_nodes=15,
        l2_regularization=1.0,
        random_state=seed,
    )


def clinical_numbers(cases: pl.DataFrame) -> list[pl.Expr]:
    """The :data:`CLINICAL_NUMERIC` columns of ``cases``: age, and sex as 1 (M) / 0 (F); null if absent."""
    age = pl.col("age").cast(pl.Float64) if "age" in cases.columns else pl.lit(None, pl.Float64)
    sex = (
        pl.when(pl.col("sex") == "M").then(1.0).when(pl.col("sex") == "F").then(0.0).otherwise(None)
        if "sex" in cases.columns
        else pl.lit(None, pl.Float64)
    )
    return [age.alias(CLINICAL_NUMERIC[0]), sex.alias(CLINICAL_NUMERIC[1])]


def _labelled(frame: pl.DataFrame) -> pl.DataFrame:
    if "label" not in frame.columns:
        raise ValueError("the training table needs a 'label' column")
    known = frame.filter(pl.col("label").is_in(KNOWN_LABELS))
    if known.height < frame.height:
        log.info(
            "training on %d labelled cases; %d unlabelled left out", known.height, frame.height - known.height
        )
    if known.height == 0:
        raise ValueError("no labelled training cases (labels 'ischemic' / 'non-ischemic')")
    return known


class MajorityBaseline:
    """Answers the training split's majority class for every case; its score is the training prevalence."""

    name = "Majority class"

    def __init__(self) -> None:
        self.prevalence: float | None = None

    def fit(self, train: pl.DataFrame) -> MajorityBaseline:
        """Learn the majority class from ``train['label']`` (unlabelled rows are left out)."""
        self.prevalence = float(labels_to_truth(_labelled(train)["label"]).mean())
        return self

    @property
    def answer(self) -> bool:
        if self.prevalence is None:
            raise RuntimeError("MajorityBaseline is not fitted: call fit(train) first")
        return self.prevalence >= 0.5

    def predict(self, cases: pl.DataFrame) -> Predictions:
        """The majority answer for every case of ``cases`` (needs ``record_id``)."""
        n = cases.height
        return Predictions(
            name=self.name,
            record_id=cases["record_id"].to_list(),
            y_pred=[self.answer] * n,
            p_yes=np.full(n, self.prevalence),
        )


class FeatureBaseline:
    """Gradient boosting on measured ECG features, age, sex and note word flags (see module doc).

    Args:
        seed: random state of the booster.
        max_iter: boosting rounds (early stopping on a 10 % validation part when training has
            more than 10,000 cases, scikit-learn's default).
        learning_rate: booster learning rate.
        use_note: include the note's word flags (False: ECG features, age and sex only).
        n_threads: OpenMP threads for fitting and predicting (None: all cores). 1 by default:
            on a shared 2-core machine the booster's default of one thread per core, competing
            with other work, made fitting 12x slower than one thread (measured).
    """

    name = "Feature baseline (gradient boosting)"

    def __init__(
        self,
        seed: int = DEFAULT_SEED,
        max_iter: int = BOOST_MAX_ITER,
        learning_rate: float = BOOST_LEARNING_RATE,
        use_note: bool = True,
        n_threads: int | None = 1,
    ) -> None:
        self.n_threads = n_threads
        self.seed = seed
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.use_note = use_note
        self.pipeline: Pipeline | None = None
        self.numeric: list[str] = []
        self.train: pl.DataFrame | None = None  # the rows it was fitted on: what save() keeps

    def _frame(self, cases: pl.DataFrame):  # -> pandas.DataFrame
        missing = [c for c in MEASURED_COLUMNS if c not in cases.columns]
        if missing:
            raise ValueError(
                f"cases lack measured feature columns {missing[:5]}...; add them with "
                "ecg_r1.data.features.with_features(cohort, signals)"
            )
        cols = [pl.col(c).cast(pl.Float64) for c in MEASURED_COLUMNS]
        note = pl.col("note").fill_null("") if "note" in cases.columns else pl.lit("")
        territory = []
        for name, leads in TERRITORIES.items():
            amps = [pl.col(f"t_amp_{lead}").cast(pl.Float64) for lead in leads]
            territory.append(
                pl.sum_horizontal([(a < TWI_THRESHOLD_MV).cast(pl.Float64) for a in amps]).alias(
                    f"n_twi_{name}"
                )
            )
            territory.append(pl.min_horizontal(amps).alias(f"min_t_{name}"))
        out = cases.select(*cols, *territory, *clinical_numbers(cases), note.cast(pl.String).alias("note"))
        return out.to_pandas()

    def _build(self, with_note: bool) -> Pipeline:
        numeric = [*MEASURED_COLUMNS, *TERRITORY_COLUMNS, *CLINICAL_NUMERIC]
        blocks = [("numeric", "passthrough", numeric)]
        if with_note:
            blocks.append(
                (
                    "note",
                    note_vectorizer(),
                    "note",
                )
            )
        return Pipeline(
            [
                ("columns", ColumnTransformer(blocks, sparse_threshold=0.0)),
                ("boost", boosted_classifier(self.seed, self.max_iter, self.learning_rate)),
            ]
        )

    def fit(self, train: pl.DataFrame) -> FeatureBaseline:
        """Train on the labelled rows of ``train`` (cohort columns + :func:`with_features` columns).

        Raises:
            ValueError: without labelled cases, with one class only, or without feature columns.
        """
        train = _labelled(train)
        self.train = train.select([c for c in (*MEASURED_COLUMNS, *TRAINING_FIELDS) if c in train.columns])
        y = labels_to_truth(train["label"])
        if y.all() or not y.any():
            raise ValueError("the training split holds one class only; a classifier needs both")
        x = self._frame(train)
        pipeline = self._build(self.use_note)
        with threadpool_limits(self.n_threads):
            try:
                pipeline.fit(x, y)
            except ValueError as err:
                if not (self.use_note and "vocabulary" in str(err)):
                    raise
                # Notes too few or too short for any word to reach NOTE_MIN_DF: train without them.
                log.warning("note vocabulary is empty (%s); training without note flags", err)
                pipeline = self._build(False)
                pipeline.fit(x, y)
        self.pipeline = pipeline
        return self

    def predict(self, cases: pl.DataFrame) -> Predictions:
        """Answer (probability >= 0.5) and probability of ischemia for every case."""
        if self.pipeline is None:
            raise RuntimeError("FeatureBaseline is not fitted: call fit(train) first")
        with threadpool_limits(self.n_threads):
            p = self.pipeline.predict_proba(self._frame(cases))[:, 1] if cases.height else np.zeros(0)
        return Predictions(
            name=self.name,
            record_id=cases["record_id"].to_list(),
            y_pred=[bool(v >= 0.5) for v in p],
            p_yes=p,
        )

    def params(self) -> dict[str, Any]:
        """The constructor arguments, as JSON-safe values."""
        return {
            "seed": self.seed,
            "max_iter": self.max_iter,
            "learning_rate": self.learning_rate,
            "use_note": self.use_note,
            "n_threads": self.n_threads,
        }

    def save(self, path: str | Path) -> Path:
        """Write the training rows and parameters as one Parquet file (data only, never code).

        A pickle would run whatever code a crafted file holds as soon as it is loaded (and
        ``ecg-r1 evaluate --baselines DIR`` loads from any folder it is given), so the baseline is
        stored as what it was fitted from and :meth:`load` fits it again: with the same rows,
        seed and thread count the booster is deterministic, so the scores are the same.
        """
        if self.train is None:
            raise RuntimeError("FeatureBaseline is not fitted: call fit(train) first")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = self.train.to_arrow()
        meta = {**(table.schema.metadata or {}), SAVED_PARAMS_KEY: json.dumps(self.params()).encode()}
        pq.write_table(table.replace_schema_metadata(meta), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureBaseline:
        """Fit again what :meth:`save` wrote (a second or two for a few thousand rows).

        Raises:
            ValueError: when the file is not a saved baseline.
        """
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(SAVED_PARAMS_KEY)
        if raw is None:
            raise ValueError(
                f"{path} is not a saved feature baseline (no {SAVED_PARAMS_KEY.decode()} metadata)"
            )
        params = json.loads(raw)
        allowed = ("seed", "max_iter", "learning_rate", "use_note", "n_threads")
        return cls(**{k: params[k] for k in allowed if k in params}).fit(pl.from_arrow(table))


def clinicians_metrics() -> BinaryMetrics:
    """The cited clinicians' row: PPV :data:`CLINICIANS_PPV`, everything else unknown, n = 0.

    The paper quotes a PPV, not an accuracy, so only ``ppv`` is set; no interval (not measured).
    """
    nan = Estimate(math.nan, math.nan, math.nan, 0)
    return BinaryMetrics(
        accuracy=nan,
        sensitivity=nan,
        specificity=nan,
        ppv=Estimate(CLINICIANS_PPV, math.nan, math.nan, 0),
        npv=nan,
        f1=nan,
        auroc=nan,
        valid_rate=nan,
        n=0,
        n_positive=0,
        n_invalid=0,
    )


def bayes_ceiling(truth: pl.DataFrame, cases: pl.DataFrame | None = None) -> Predictions:
    """The Bayes-optimal answers of the simulator for the given cases.

    Args:
        truth: the simulator's ``truth.parquet`` (``record_id`` and ``posterior_ischemic``, or
            ``posterior``).
        cases: the cases to answer (``record_id``); all of ``truth`` when None.

    Returns:
        Predictions with ``p_yes`` = posterior and answer = posterior >= 0.5.

    Raises:
        ValueError: without a posterior column, or for cases the truth table does not know (a
            real cohort has no Bayes ceiling).
    """
    column = next((c for c in POSTERIOR_COLUMNS if c in truth.columns), None)
    if column is None:
        raise ValueError(
            f"truth table has none of {POSTERIOR_COLUMNS}; the Bayes ceiling exists only for the simulated "
            "cohort (data/raw/simulated/truth.parquet)"
        )
    table = truth.select("record_id", pl.col(column).cast(pl.Float64).alias("posterior"))
    if cases is not None:
        ids = cases.select("record_id")
        table = ids.join(table, on="record_id", how="left", maintain_order="left")
        unknown = table.filter(pl.col("posterior").is_null()).height
        if unknown:
            raise ValueError(
                f"{unknown} of {ids.height} cases are not in the truth table; the Bayes ceiling needs "
                "the simulated cohort's truth.parquet for every case"
            )
    post = table["posterior"].to_numpy()
    return Predictions(
        name="Bayes-optimal ceiling (simulator)",
        record_id=table["record_id"].to_list(),
        y_pred=[bool(v >= 0.5) for v in post],
        p_yes=post,
    )
