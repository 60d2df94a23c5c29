"""The real-record (sim-to-real) section of the comparison: preparing real records, the section's
rows, n and intervals, records never trained on, and the shared LUDB + CinC records."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from test_train import ANTERIOR, LATERAL, make_cohort, synthetic_signal, tiny_test_profile

from ecg_r1.data.canonical import FS, LEADS
from ecg_r1.data.readers.wfdb_write import write_record
from ecg_r1.data.store import read_cohort
from ecg_r1.evaluation.cases import add_features, evaluation_cases, real_record_cases
from ecg_r1.evaluation.comparison import ComparisonInputs, ComparisonSettings, run_comparison
from ecg_r1.evaluation.real_records import (
    REAL_SPLIT,
    REAL_TITLE,
    paths_from_env,
    prepare_real_records,
    read_real_records,
)
from ecg_r1.evaluation.references import ReferenceBaselines
from ecg_r1.evaluation.results import Comparison
from ecg_r1.modeling.build import build_base_model, corpus_from_cases
from ecg_r1.modeling.profiles import load_profile

N_BOOT = 200
FEATURE_ROW = "Feature baseline (gradient boosting)"
# record_id, label, twi: six labelled TWI cases, one without a label, one without TWI, and one
# whose id is a training record of the main cohort (it must be left out).
REAL_ROWS = [
    *((f"R-{i}", "ischemic" if i % 2 == 0 else "non-ischemic", "true") for i in range(6)),
    ("R-unknown", "", "true"),
    ("R-no-twi", "ischemic", "false"),
    ("sim/0000", "ischemic", "true"),
]


def write_real_export(folder: Path, seed: int = 7) -> Path:
    """A manifest export of the records in :data:`REAL_ROWS` (WFDB files beside a manifest.csv)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, (record_id, label, twi) in enumerate(REAL_ROWS):
        leads = ANTERIOR if label == "ischemic" else LATERAL
        signal = synthetic_signal(rng, leads, wide_qrs=label != "ischemic")
        write_record(folder / "records" / f"r{k}", signal.T, FS, LEADS)
        rows.append([f"records/r{k}.hea", record_id, f"rp{k}", "real-site", label, twi, "chest pain"])
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["signal_path", "record_id", "patient_id", "hospital", "label", "twi", "note"])
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("real")
    data = make_cohort(root, n=32)
    profile_path = tiny_test_profile(root / "profile.yaml", grpo={"max_completion_length": 8})
    profile = load_profile(profile_path)
    cases = pl.read_parquet(data["cohort"] / "cohort.parquet").to_dicts()
    model = build_base_model(profile, corpus_from_cases(cases), root / "model")
    export = write_real_export(root / "export")
    real = prepare_real_records([export], root / "real_records", profile.render_config())
    # A real record whose signal file is also a training record of the main cohort under another
    # id (the same checksum): it may have been trained on, so it must be left out too.
    cohort = read_cohort(data["cohort"])
    twin = read_cohort(real.cohort).filter(pl.col("record_id") == "R-5")["checksum"].item()
    cohort.with_columns(
        checksum=pl.when(pl.col("record_id") == "sim/0001").then(pl.lit(twin)).otherwise(pl.col("checksum"))
    ).write_parquet(data["cohort"] / "cohort.parquet")
    return {**data, "profile": profile_path, "model": model, "export": export, "real": real}


@pytest.fixture(scope="module")
def result(setup, tmp_path_factory) -> Comparison:
    return run_comparison(
        {"GRPO": setup["model"], "SFT": setup["model"]},
        setup["profile"],
        ComparisonInputs(
            setup["cohort"], setup["splits"], setup["images"], real_records=setup["real"].folder
        ),
        tmp_path_factory.mktemp("out"),
        ComparisonSettings(n_boot=N_BOOT, max_new_tokens=4, n_case_figures=0),
    )


def section(table: str) -> list[str]:
    """The comparison table's lines of the real-record split (not the paired comparisons')."""
    return [line for line in table.splitlines() if line.split(" | ")[1:2] == [REAL_TITLE]]


class TestPrepare:
    def test_keeps_labelled_twi_records_rendered_at_the_profile_page(self, setup):
        real = setup["real"]
        assert real.records == len(REAL_ROWS) and real.quarantined == 0
        assert real.cases == 7  # R-0..R-5 and sim/0000; not the unlabelled nor the non-TWI one
        assert real.by_label == {"ischemic": 4, "non-ischemic": 3}
        assert read_real_records(real.folder) == real
        manifest = pl.read_parquet(real.splits)
        assert set(manifest["split"]) == {REAL_SPLIT}
        assert "R-unknown" not in manifest["record_id"] and "R-no-twi" not in manifest["record_id"]
        index = pl.read_parquet(real.images / "index.parquet")
        assert sorted(index["record_id"]) == sorted(manifest["record_id"])
        page = load_profile(setup["profile"]).render_config()
        with Image.open(real.images / index["image_path"][0]) as image:
            assert image.size == (page.width_px, page.height_px)

    def test_no_labelled_twi_record_is_refused(self, setup, tmp_path):
        only = tmp_path / "only"
        write_real_export(only)
        manifest = pl.read_csv(only / "manifest.csv").filter(pl.col("record_id") == "R-unknown")
        manifest.write_csv(only / "manifest.csv")
        with pytest.raises(ValueError, match="labelled TWI"):
            prepare_real_records([only], tmp_path / "out", load_profile(setup["profile"]).render_config())

    def test_paths_from_env(self, monkeypatch):
        import os

        monkeypatch.setenv("ECG_R1_REAL_RECORDS", f"/a{os.pathsep}{os.pathsep}/b")
        assert paths_from_env() == ["/a", "/b"]
        monkeypatch.delenv("ECG_R1_REAL_RECORDS")
        assert paths_from_env() == []


@pytest.mark.slow  # renders real records and runs a comparison
class TestRealRecordSection:
    def test_rows_n_and_intervals(self, result):
        lines = section(result.table)
        names = [line.split(" | ")[0].removeprefix("| ") for line in lines]
        # Models and the reference rows that apply to real data; no simulator ceiling, no cited row.
        assert names == ["GRPO", "SFT", FEATURE_ROW, "Majority class"]
        for line in lines:
            assert "| 5 |" in line and "[" in line  # n = 7 - 2 left out, with a bootstrap interval
        for name in names:
            m = result.results[name][REAL_SPLIT]
            assert m.n == 5 and m.accuracy.low <= m.accuracy.value <= m.accuracy.high
        assert f"**{REAL_TITLE}**: 5 labelled TWI records (3 ischemic)" in result.table
        assert "Left out: 2 records also in the main cohort" in result.table

    def test_records_in_the_main_cohort_are_left_out(self, setup, result):
        assert sorted(result.real_records["excluded_in_main_cohort"]) == ["R-5", "sim/0000"]
        evaluated = set(result.predictions["GRPO"].record_id)
        real = set(pl.read_parquet(result.files["cases"]).filter(pl.col("split") == REAL_SPLIT)["record_id"])
        assert real == {"R-0", "R-1", "R-2", "R-3", "R-4"} and real <= evaluated
        # None of them is a record, or a signal file, of the main cohort that training reads.
        main = read_cohort(setup["cohort"])
        real_sums = set(read_cohort(setup["real"].cohort).filter(pl.col("record_id").is_in(real))["checksum"])
        assert not real & set(main["record_id"]) and not real_sums & set(main["checksum"])

    def test_reference_rows_fitted_on_train_features_from_the_real_signals(self, setup, result):
        train = add_features(
            evaluation_cases(setup["cohort"], setup["splits"], setup["images"], "train"),
            setup["cohort"],
        )
        baselines = ReferenceBaselines.fit(train)
        cases, _ = real_record_cases(setup["real"].folder, setup["cohort"], setup["splits"])
        expected = baselines.feature.predict(cases)
        got = result.predictions[FEATURE_ROW]
        where = {rid: i for i, rid in enumerate(got.record_id)}
        np.testing.assert_allclose([got.p_yes[where[r]] for r in expected.record_id], expected.p_yes)
        majority = result.predictions["Majority class"]
        assert {majority.y_pred[where[r]] for r in expected.record_id} == {baselines.majority.answer}

    def test_paired_comparisons_and_metrics_file(self, result):
        assert ("GRPO", "SFT", REAL_SPLIT) in {(p.a, p.b, p.split) for p in result.paired}
        paired_lines = [line for line in result.table.splitlines() if line.startswith("| GRPO | SFT |")]
        assert any(f"| {REAL_TITLE} | 5 |" in line for line in paired_lines)
        metrics = json.loads(result.files["metrics"].read_text())
        assert metrics["splits"][REAL_SPLIT]["n"] == 5
        assert metrics["splits"][REAL_SPLIT]["hospitals"] == ["real-site"]
        assert metrics["real_records"]["inputs"] == [str(result.real_records["inputs"][0])]
        rows = {(r["name"], r["split"]) for r in metrics["rows"]}
        assert ("Majority class", REAL_SPLIT) in rows and ("GRPO", REAL_SPLIT) in rows
        # The simulated sections and the per-hospital figures do not change meaning.
        assert set(result.per_hospital["GRPO"]) == {"H1", "H2"}
        assert result.files["roc_real_records"].is_file()

    def test_all_records_in_the_main_cohort_is_refused(self, setup, tmp_path):
        real = prepare_real_records(
            [setup["export"]], tmp_path / "real", load_profile(setup["profile"]).render_config()
        )
        manifest = pl.read_parquet(real.splits).filter(pl.col("record_id") == "sim/0000")
        manifest.write_parquet(real.splits)
        with pytest.raises(ValueError, match="also in the main cohort"):
            run_comparison(
                {"SFT": setup["model"]},
                setup["profile"],
                ComparisonInputs(setup["cohort"], setup["splits"], setup["images"], real_records=real.folder),
                tmp_path / "out",
                ComparisonSettings(n_boot=0, max_new_tokens=2, n_case_figures=0),
            )


@pytest.mark.slow  # a whole ecg-r1 evaluate run: about 4 s
def test_evaluate_command_with_real_records(setup, tmp_path, capsys):
    from ecg_r1.cli import main

    code = main(
        [
            "evaluate",
            "--model",
            f"SFT={setup['model']}",
            "--cohort",
            str(setup["cohort"]),
            "--splits",
            str(setup["splits"]),
            "--images",
            str(setup["images"]),
            "--out",
            str(tmp_path / "out"),
            "--profile",
            str(setup["profile"]),
            "--n-boot",
            "0",
            "--max-new-tokens",
            "2",
            "--real-records",
            str(setup["export"]),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"| SFT | {REAL_TITLE} | 5 |" in out and f"| Majority class | {REAL_TITLE} | 5 |" in out
    assert read_real_records(tmp_path / "out" / REAL_SPLIT).cases == 7


@pytest.mark.slow  # reads and renders the shared real records: about 4 s
def test_shared_ludb_and_cinc_records(setup, ludb_dir, cinc_dir, tmp_path):
    """The real LUDB and CinC records: about 35 labelled TWI cases of both labels and sources (~5 s)."""
    started = time.perf_counter()
    page = load_profile(setup["profile"]).render_config()
    real = prepare_real_records([ludb_dir, cinc_dir], tmp_path / "real", page, workers=2)
    assert 25 <= real.cases <= 45, real
    assert set(real.by_source) == {"ludb", "cinc"} and set(real.by_label) == {"ischemic", "non-ischemic"}
    out = run_comparison(
        {"SFT": setup["model"]},
        setup["profile"],
        ComparisonInputs(setup["cohort"], setup["splits"], setup["images"], real_records=real.folder),
        tmp_path / "out",
        ComparisonSettings(n_boot=N_BOOT, max_new_tokens=2, n_case_figures=0),
    )
    m = out.results[FEATURE_ROW][REAL_SPLIT]
    assert m.n == real.cases and out.results["SFT"][REAL_SPLIT].n == real.cases
    # At n ~ 35 a 95 % interval on accuracy is wide: about +-0.15.
    assert m.accuracy.high - m.accuracy.low > 0.15
    print(f"shared real records: {real.cases} cases, {real.by_source}, {time.perf_counter() - started:.1f} s")
