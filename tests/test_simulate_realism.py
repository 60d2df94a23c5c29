"""The generator's normal ECGs against the real normal-looking records of LUDB (see ecg_r1.simulate.realism)."""

from __future__ import annotations

import polars as pl
import pytest

from ecg_r1.data.canonical import LEADS
from ecg_r1.simulate.realism import compare, ludb_normal_ids, measure_ludb, simulate_normals

# Leads where a normal adult T wave is upright (LUDB: 100 % of its normal-looking records).
UPRIGHT = ("I", "II", "aVF", "V2", "V3", "V4", "V5", "V6")


@pytest.fixture(scope="module")
def side_by_side(ludb_dir) -> pl.DataFrame:
    real = measure_ludb(ludb_dir)
    sim = simulate_normals(160, seed=1)
    return compare(real, sim)


def _row(table: pl.DataFrame, measure: str) -> dict:
    return table.filter(pl.col("measure") == measure).row(0, named=True)


def test_ludb_selection_is_the_normal_looking_records(ludb_dir):
    ids = ludb_normal_ids(ludb_dir)
    assert 30 <= len(ids) <= 60
    assert "1" not in ids  # record 1: LVH, left axis deviation


@pytest.mark.parametrize("measure", ["heart_rate", "qrs_ms"])
def test_rate_and_qrs_duration_overlap(side_by_side, measure):
    r = _row(side_by_side, measure)
    # interquartile ranges overlap and the medians lie within 15 % of each other
    assert r["sim_q25"] <= r["real_q75"] and r["real_q25"] <= r["sim_q75"], r
    assert abs(r["sim_q50"] - r["real_q50"]) <= 0.15 * r["real_q50"], r


@pytest.mark.parametrize("lead", LEADS)
def test_qrs_share_of_each_lead_overlaps(side_by_side, lead):
    r = _row(side_by_side, f"qrs_amp_{lead}")
    assert abs(r["sim_q50"] - r["real_q50"]) <= 0.15, r


@pytest.mark.parametrize("lead", LEADS)
def test_t_amplitude_per_lead_overlaps(side_by_side, lead):
    r = _row(side_by_side, f"t_amp_{lead}")
    assert abs(r["sim_q50"] - r["real_q50"]) <= 0.12, r
    assert r["sim_q25"] <= r["real_q75"] + 0.05 and r["real_q25"] <= r["sim_q75"] + 0.05, r


def test_t_polarity_per_lead(side_by_side):
    for lead in UPRIGHT:
        r = _row(side_by_side, f"t_amp_{lead}")
        assert r["real_pos"] >= 0.9 and r["sim_pos"] >= 0.8, r
    avr = _row(side_by_side, "t_amp_aVR")
    assert avr["real_neg"] >= 0.9 and avr["sim_neg"] >= 0.9
    # III, aVL and V1 vary in both: neither always upright nor always inverted
    for lead in ("III", "aVL", "V1"):
        r = _row(side_by_side, f"t_amp_{lead}")
        assert r["sim_pos"] < 0.95 and r["sim_neg"] > 0.0, r
        assert abs(r["sim_pos"] - r["real_pos"]) <= 0.3, r
