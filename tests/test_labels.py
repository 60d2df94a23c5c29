"""Label rules (configs/labels.yaml) on real codes and measured T waves."""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from ecg_r1.data.labels import (
    DEFAULT_RULES,
    label_cinc,
    label_ludb_diagnoses,
    label_ptbxl,
    load_rules,
    measure_twi,
    parse_dx,
    parse_manifest_label,
    parse_manifest_twi,
    t_wave_amplitudes,
)
from ecg_r1.data.readers.ludb import diagnoses, lead_t_amplitudes
from ecg_r1.data.readers.wfdb_header import parse_comments, parse_header
from ecg_r1.data.readers.wfdb_signal import read_signal


@pytest.fixture(scope="module")
def rules():
    return load_rules()


def _rules_with(tmp_path: Path, edit) -> Path:
    config = yaml.safe_load(DEFAULT_RULES.read_text())
    edit(config)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class TestCinc:
    def test_twi_and_ischemic_codes(self, rules) -> None:
        decision = label_cinc(parse_dx("428750005,426434006,59931005,164934002"), rules)
        assert decision.twi and decision.label == "ischemic"
        assert decision.raw_codes == "428750005,426434006,59931005,164934002"

    def test_t_wave_abnormal_is_switchable(self, rules, tmp_path: Path) -> None:
        assert label_cinc(["164934002", "426783006"], rules).twi
        off = load_rules(
            _rules_with(tmp_path, lambda c: c["cinc"]["twi"].update(include_t_wave_abnormal=False))
        )
        assert not label_cinc(["164934002", "426783006"], off).twi
        assert label_cinc(["59931005"], off).twi

    def test_non_ischemic_unknown_and_empty(self, rules) -> None:
        assert label_cinc(["426783006", "164873001"], rules).label == "non-ischemic"  # sinus rhythm, LVH
        assert label_cinc(["10370003", "59931005"], rules).label == "unknown"  # paced
        assert label_cinc([], rules).label == "unknown"

    def test_real_headers(self, cinc_dir: Path, rules) -> None:
        labels = {}
        for header_path in sorted(cinc_dir.glob("*.hea")):
            header = parse_header(header_path)
            labels[header_path.stem] = label_cinc(parse_dx(parse_comments(header.comments).get("dx")), rules)
        # E00666 (written "#Dx:") has anterior ischemia and T wave inversion.
        assert labels["E00666"].twi and labels["E00666"].label == "ischemic"
        # HR06000: T wave abnormal + sinus rhythm.
        assert labels["HR06000"].twi and labels["HR06000"].label == "non-ischemic"
        assert all(d.raw_codes for d in labels.values())


class TestPtbxl:
    def test_real_rows(self, ptbxl_meta_dir: Path, rules) -> None:
        resolved = rules.with_ptbxl_statements(ptbxl_meta_dir / "scp_statements.csv")
        with (ptbxl_meta_dir / "ptbxl_database_excerpt.csv").open(newline="") as handle:
            rows = {row["ecg_id"]: ast.literal_eval(row["scp_codes"]) for row in csv.DictReader(handle)}
        invt = label_ptbxl(rows["6015"], resolved)
        assert invt.twi and invt.label == "ischemic" and "INVT" in invt.raw_codes
        ndt = label_ptbxl(rows["6017"], resolved)
        assert ndt.twi and ndt.label == "non-ischemic"
        assert label_ptbxl(rows["6002"], resolved) == label_ptbxl(
            {"NORM": 100.0, "IRBBB": 100.0, "SBRAD": 0.0}, resolved
        )

    def test_mi_statements_come_from_the_statement_table(self, ptbxl_meta_dir: Path, rules) -> None:
        resolved = rules.with_ptbxl_statements(ptbxl_meta_dir / "scp_statements.csv")
        assert {"IMI", "ASMI", "PMI", "INJAS"} <= resolved.ptbxl_resolved
        assert label_ptbxl({"IMI": 100.0, "INVT": 0.0}, resolved).label == "ischemic"
        # Without the table only the listed ISC statements count.
        assert label_ptbxl({"IMI": 100.0}, rules).label == "non-ischemic"

    def test_likelihood(self, rules) -> None:
        assert label_ptbxl({"ISCAL": 100.0}, rules).label == "ischemic"
        assert label_ptbxl({"ISCAL": 0.0}, rules).label == "ischemic"  # 0 = likelihood not given
        assert label_ptbxl({"ISCAL": 15.0, "NORM": 100.0}, rules).label == "unknown"
        assert label_ptbxl({"PACE": 0.0, "NORM": 50.0}, rules).label == "unknown"
        assert label_ptbxl({}, rules).label == "unknown"

    def test_other_t_statements_are_switchable(self, rules, tmp_path: Path) -> None:
        off = load_rules(
            _rules_with(tmp_path, lambda c: c["ptbxl"]["twi"].update(include_t_wave_abnormal=False))
        )
        assert label_ptbxl({"TAB_": 0.0}, rules).twi and not label_ptbxl({"TAB_": 0.0}, off).twi
        assert label_ptbxl({"INVT": 0.0}, off).twi


class TestLudb:
    def test_ischemia_count_matches_the_database_description(self, ludb_dir: Path, rules) -> None:
        labels = [
            label_ludb_diagnoses(diagnoses(parse_header(p)), rules)
            for p in sorted((ludb_dir / "data").glob("*.hea"))
        ]
        # LUDB's README: "any ischemia 51". 9 records are paced; the 7 of them without an ischemia
        # diagnosis are unknown (an ischemia diagnosis wins over pacing).
        assert labels.count("ischemic") == 51
        assert labels.count("unknown") == 7

    def test_t_amplitude_against_the_signal(self) -> None:
        fs = 500.0
        signal = np.zeros(1000)
        signal[100:110] = 0.05  # PR baseline before QRS onset at 110
        signal[300] = -0.25  # T peak
        samples = np.array([105, 110, 130, 150, 250, 300, 350])
        symbols = ["p", "(", "N", ")", "(", "t", ")"]
        amps = t_wave_amplitudes(signal, samples, symbols, fs, baseline_window_ms=20)
        np.testing.assert_allclose(amps, [-0.30])

    def test_t_without_qrs_onset_is_skipped(self) -> None:
        amps = t_wave_amplitudes(np.ones(100), np.array([10, 50]), ["N", "t"], 500.0, 20)
        assert amps.size == 0

    def test_measure_twi_needs_two_upright_leads(self, rules) -> None:
        deep = np.array([-0.3, -0.25, -0.2])
        assert measure_twi({"aVR": deep, "III": deep, "V1": deep}, rules)[0] is False
        twi, leads, detail = measure_twi({"V4": deep, "V5": deep, "V6": np.array([0.3, 0.2])}, rules)
        assert twi and leads == ("V4", "V5") and detail.startswith("T-:V4=-0.25")
        # Half the beats inverted in a lead is enough (min_fraction 0.5), fewer is not.
        assert measure_twi({"V4": np.array([-0.3, 0.2]), "V5": np.array([-0.3, 0.1])}, rules)[0]
        assert not measure_twi({"V4": np.array([-0.3, 0.2, 0.2]), "V5": deep}, rules)[0]

    def test_measured_twi_on_a_real_record(self, ludb_dir: Path, rules) -> None:
        # Record 24: STEMI with deep anterolateral T inversion.
        header = parse_header(ludb_dir / "data" / "24.hea")
        amplitudes = lead_t_amplitudes(header, read_signal(header).signal, rules)
        twi, leads, _ = measure_twi(amplitudes, rules)
        assert twi and {"V4", "V5"} <= set(leads)
        assert np.median(amplitudes["V4"]) < -0.3
        # aVR mirrors the lateral inversion (upright T there); aVR is never a TWI lead.
        assert "aVR" not in leads and np.median(amplitudes["aVR"]) > 0.1


class TestManifestValues:
    @pytest.mark.parametrize(
        ("cell", "label"),
        [
            ("ischemic", "ischemic"),
            ("YES", "ischemic"),
            ("1", "ischemic"),
            ("no", "non-ischemic"),
            ("Non-Ischemic", "non-ischemic"),
            ("", "unknown"),
            ("unknown", "unknown"),
        ],
    )
    def test_label_words(self, cell: str, label: str) -> None:
        assert parse_manifest_label(cell) == label

    def test_bad_label_names_the_accepted_values(self) -> None:
        with pytest.raises(ValueError, match="ischemic, non-ischemic, unknown"):
            parse_manifest_label("maybe")

    def test_twi_default(self, rules) -> None:
        assert parse_manifest_twi("", [], rules) is True
        assert parse_manifest_twi("no", ["V4"], rules) is False
        assert parse_manifest_twi("1", [], rules) is True


class TestRulesFile:
    def test_missing_key_is_named(self, tmp_path: Path) -> None:
        path = _rules_with(tmp_path, lambda c: c.pop("ludb"))
        with pytest.raises(ValueError, match="'ludb'"):
            load_rules(path)

    def test_bad_lead_name_is_refused(self, tmp_path: Path) -> None:
        path = _rules_with(tmp_path, lambda c: c["ludb"]["twi_measurement"].update(upright_leads=["V7"]))
        with pytest.raises(ValueError, match="V7"):
            load_rules(path)
