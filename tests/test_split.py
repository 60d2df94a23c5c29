"""Hospital-aware, patient-level, stratified splitting (ecg_r1.data.split)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ecg_r1.data.split import (
    SPLITS,
    SplitError,
    held_out_leaks,
    patients_in_several_splits,
    read_splits,
    split_cohort,
    split_summary,
    write_splits,
)

HOSPITALS = ("hospital_a", "hospital_b", "hospital_c", "hospital_d")


def make_cohort(n_patients: int = 400, seed: int = 0) -> pl.DataFrame:
    """A cohort table: 1-3 records a patient, one hospital a patient, prevalence varying by hospital."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        hospital = HOSPITALS[p % len(HOSPITALS)]
        prevalence = 0.3 + 0.1 * (p % len(HOSPITALS))
        label = "ischemic" if rng.random() < prevalence else "non-ischemic"
        for r in range(int(rng.integers(1, 4))):
            rows.append(
                {
                    "record_id": f"{hospital}/p{p:04d}_r{r}",
                    "patient_id": f"{hospital}/p{p:04d}",
                    "hospital": hospital,
                    "label": label,
                    "twi": True,
                }
            )
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def cohort() -> pl.DataFrame:
    return make_cohort()


def split(cohort: pl.DataFrame, **kwargs) -> pl.DataFrame:
    args = {"held_out_hospitals": ["hospital_d"], "val_fraction": 0.15, "test_fraction": 0.15, "seed": 7}
    return split_cohort(cohort, **(args | kwargs))


class TestSplitCohort:
    def test_every_record_gets_one_known_split(self, cohort):
        result = split(cohort)
        assert result.columns == ["record_id", "patient_id", "hospital", "label", "split"]
        assert result.height == cohort.height
        assert result.get_column("record_id").n_unique() == cohort.height
        assert set(result.get_column("split").unique()) == set(SPLITS)

    def test_no_patient_in_two_splits(self, cohort):
        result = split(cohort)
        assert patients_in_several_splits(result) == []
        per_patient = result.group_by("patient_id").agg(pl.col("split").n_unique())
        assert per_patient.get_column("split").max() == 1

    def test_held_out_hospital_only_in_external_test(self, cohort):
        result = split(cohort, held_out_hospitals=["hospital_c", "hospital_d"])
        external = result.filter(pl.col("split") == "test_external")
        assert set(external.get_column("hospital").unique()) == {"hospital_c", "hospital_d"}
        assert held_out_leaks(result, ["hospital_c", "hospital_d"]).height == 0
        inside = result.filter(pl.col("split") != "test_external").get_column("hospital").unique()
        assert set(inside) == {"hospital_a", "hospital_b"}

    def test_fractions_and_label_stratification_within_tolerance(self, cohort):
        result = split(cohort)
        internal = result.filter(pl.col("split") != "test_external")
        n = internal.height
        overall = (internal.get_column("label") == "ischemic").mean()
        for name, fraction in (("train", 0.70), ("val", 0.15), ("test_internal", 0.15)):
            part = internal.filter(pl.col("split") == name)
            assert abs(part.height / n - fraction) < 0.03, (name, part.height, n)
            prevalence = (part.get_column("label") == "ischemic").mean()
            assert abs(prevalence - overall) < 0.04, (name, prevalence, overall)
            # each internal hospital is represented in every split (stratified by hospital too)
            assert set(part.get_column("hospital").unique()) == {"hospital_a", "hospital_b", "hospital_c"}

    def test_deterministic_for_a_seed_and_independent_of_row_order(self, cohort):
        first = split(cohort, seed=3)
        again = split(cohort.sample(fraction=1.0, shuffle=True, seed=11), seed=3)
        assert first.equals(again)
        other = split(cohort, seed=4)
        assert not first.equals(other)

    def test_filters_non_twi_and_unknown_labels_unless_asked(self, cohort):
        marked = cohort.with_columns(
            pl.when(pl.int_range(pl.len()) % 10 == 0)
            .then(pl.lit("unknown"))
            .otherwise("label")
            .alias("label"),
            (pl.int_range(pl.len()) % 7 != 0).alias("twi"),
        )
        result = split(marked)
        assert "unknown" not in result.get_column("label").to_list()
        kept = set(result.get_column("record_id"))
        assert kept.isdisjoint(set(marked.filter(~pl.col("twi")).get_column("record_id")))
        everything = split(marked, twi_only=False, labelled_only=False)
        assert everything.height == marked.height

    def test_unknown_held_out_hospital_is_a_clear_error(self, cohort):
        with pytest.raises(
            SplitError, match=r"held-out hospital\(s\) \['hospital_z'\] are not in the cohort"
        ):
            split(cohort, held_out_hospitals=["hospital_z"])

    def test_split_that_would_be_empty_is_a_clear_error(self):
        tiny = make_cohort(n_patients=8)
        with pytest.raises(SplitError, match="would be empty"):
            split(tiny, val_fraction=0.01, test_fraction=0.01)

    def test_held_out_hospital_emptied_by_filters_is_an_error(self, cohort):
        no_twi_in_d = cohort.with_columns(pl.col("twi") & (pl.col("hospital") != "hospital_d"))
        with pytest.raises(SplitError, match="'hospital_d' has no records left"):
            split(no_twi_in_d)

    def test_patient_in_held_out_and_training_hospital_is_refused(self, cohort):
        leaking = pl.concat(
            [
                cohort,
                pl.DataFrame(
                    [
                        {
                            "record_id": "hospital_a/extra",
                            "patient_id": "hospital_d/p0003",
                            "hospital": "hospital_a",
                            "label": "ischemic",
                            "twi": True,
                        }
                    ]
                ),
            ]
        )
        with pytest.raises(SplitError, match="held-out and in a training hospital"):
            split(leaking)

    @pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
    def test_bad_fractions_are_refused(self, cohort, val, test):
        with pytest.raises(SplitError):
            split(cohort, val_fraction=val, test_fraction=test)

    def test_zero_fraction_leaves_that_split_empty(self, cohort):
        result = split(cohort, val_fraction=0.0)
        assert "val" not in result.get_column("split").to_list()

    def test_no_held_out_hospitals_means_no_external_test(self, cohort):
        result = split(cohort, held_out_hospitals=[])
        assert "test_external" not in result.get_column("split").to_list()
        assert result.height == cohort.height


class TestManifest:
    def test_write_and_read_round_trip_with_summary(self, cohort, tmp_path):
        result = split(cohort)
        path = write_splits(result, tmp_path / "splits")
        assert path == tmp_path / "splits" / "splits.parquet"
        assert read_splits(path.parent).equals(result)
        summary = pl.read_csv(path.parent / "split_summary.csv")
        assert summary.get_column("records").sum() == result.height
        assert summary.columns == ["split", "hospital", "label", "records", "patients"]
        assert summary.get_column("split").to_list()[0] == "train"

    def test_summary_counts_per_split_hospital_label(self, cohort):
        result = split(cohort)
        summary = split_summary(result)
        row = summary.filter(
            (pl.col("split") == "test_external") & (pl.col("label") == "ischemic")
        ).get_column("records")
        expected = result.filter(
            (pl.col("split") == "test_external") & (pl.col("label") == "ischemic")
        ).height
        assert row.to_list() == [expected]

    def test_missing_manifest_says_what_to_run(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="materialize cohort_splits"):
            read_splits(tmp_path)


class TestLeakDetectors:
    def test_patient_in_two_splits_is_found(self, cohort):
        result = split(cohort)
        victim = result.filter(pl.col("split") == "train").get_column("record_id")[0]
        patient = result.filter(pl.col("record_id") == victim).get_column("patient_id")[0]
        other = result.filter(pl.col("split") == "val").get_column("record_id")[0]
        broken = result.with_columns(
            pl.when(pl.col("record_id") == other)
            .then(pl.lit(patient))
            .otherwise("patient_id")
            .alias("patient_id")
        )
        assert patients_in_several_splits(broken) == [patient]

    def test_leaked_held_out_record_is_found(self, cohort):
        result = split(cohort)
        record = result.filter(pl.col("split") == "test_external").get_column("record_id")[0]
        broken = result.with_columns(
            pl.when(pl.col("record_id") == record).then(pl.lit("train")).otherwise("split").alias("split")
        )
        assert held_out_leaks(broken, ["hospital_d"]).get_column("record_id").to_list() == [record]
