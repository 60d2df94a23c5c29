"""The linear probe of a vision tower's tokens (research.probe)."""

import numpy as np
import pytest

from research.probe import (
    DEFAULT_CS,
    MEASUREMENT_ALPHAS,
    NOTE_CS,
    fit_boosted_probe,
    fit_measurement_probe,
    fit_page_and_note_probe,
    fit_probe,
)


def _cases(rng: np.random.Generator, n: int, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(n, 6, 4) 'tokens' whose label is carried by one coordinate of one token, plus noise."""
    y = rng.random(n) < 0.4
    x = rng.normal(size=(n, 6, 4))
    x[:, 2, 1] += np.where(y != flip, 1.5, -1.5)
    return x, y


def test_the_probe_reads_what_the_tokens_carry_and_is_scored_only_on_the_test_splits():
    rng = np.random.default_rng(0)
    result = fit_probe(
        _cases(rng, 400),
        _cases(rng, 200),
        {"test_internal": _cases(rng, 300), "flipped": _cases(rng, 300, flip=True)},
        n_boot=200,
    )
    assert result.c in DEFAULT_CS and set(result.selection_accuracy) == set(DEFAULT_CS)
    assert result.selection_accuracy[result.c] == max(result.selection_accuracy.values())
    internal = result.metrics["test_internal"]
    assert internal.n == 300 and internal.accuracy.value > 0.85
    assert internal.accuracy.low < internal.accuracy.value < internal.accuracy.high
    assert internal.auroc.value > 0.9
    # a test split where the token means the opposite: had the probe seen it, it would not be wrong
    assert result.metrics["flipped"].accuracy.value < 0.15


def test_tokens_without_the_label_give_a_probe_at_chance():
    rng = np.random.default_rng(1)

    def noise(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(size=(n, 6, 4)), rng.random(n) < 0.4

    result = fit_probe(noise(400), noise(200), {"test": noise(400)}, n_boot=0)
    assert 0.4 < result.metrics["test"].auroc.value < 0.6


def test_a_training_split_with_one_class_is_refused():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="ischemic and non-ischemic"):
        fit_probe((x, np.ones(5, dtype=bool)), (x, np.ones(5, dtype=bool)), {})


def _page_and_note_cases(rng: np.random.Generator, n: int, note_agrees: float = 0.75):
    """Tokens with a weak page signal and notes whose troponin agrees with the label 75% of the time."""
    y = rng.random(n) < 0.4
    x = rng.normal(size=(n, 6, 4))
    x[:, 2, 1] += np.where(y, 0.8, -0.8)
    says_yes = np.where(rng.random(n) < note_agrees, y, ~y)
    filler = ("chest pain", "breathless", "routine check")
    notes = [
        f"{filler[i % 3]}. troponin {'raised' if s else 'negative'}." if i % 10 else None
        for i, s in enumerate(says_yes)
    ]
    return x, notes, y


def test_page_and_note_readers_combine_and_each_is_scored_alone():
    rng = np.random.default_rng(2)
    result = fit_page_and_note_probe(
        _page_and_note_cases(rng, 600),
        _page_and_note_cases(rng, 300),
        {"test_internal": _page_and_note_cases(rng, 600)},
        n_boot=0,
    )
    page = result.page.metrics["test_internal"].accuracy.value
    note = result.note.metrics["test_internal"].accuracy.value
    both = result.metrics["test_internal"].accuracy.value
    assert 0.6 < page < 0.85 and 0.6 < note < 0.8  # each reader gets its part of the label
    assert both > max(page, note) + 0.03  # together they get more than either
    assert result.weights[0] > 0 and result.weights[1] > 0
    assert result.note.c in NOTE_CS and result.page.c in DEFAULT_CS


def test_notes_that_say_nothing_leave_the_combination_at_the_page_reader():
    rng = np.random.default_rng(3)
    result = fit_page_and_note_probe(
        _page_and_note_cases(rng, 600, note_agrees=0.5),
        _page_and_note_cases(rng, 300, note_agrees=0.5),
        {"test": _page_and_note_cases(rng, 600, note_agrees=0.5)},
        n_boot=0,
    )
    assert 0.4 < result.note.metrics["test"].auroc.value < 0.6
    assert abs(result.metrics["test"].accuracy.value - result.page.metrics["test"].accuracy.value) < 0.03


def _measured_pages(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens that show T amplitude in two leads (one coordinate each) and nothing of T symmetry."""
    measures = rng.normal(size=(n, 4))  # t_amp_V2, t_amp_V3, t_sym_V2, qt_ms
    x = rng.normal(size=(n, 6, 4))
    x[:, 1, 0] += 3 * measures[:, 0]
    x[:, 4, 2] += 3 * measures[:, 1]
    x[:, 3, 3] += 3 * measures[:, 3]
    measures[rng.random(n) < 0.2, 2] = np.nan  # T too flat to time in a fifth of the pages
    measures[:5, 3] = np.nan  # QT unmeasurable in a few
    return x, measures


def test_the_measurement_probe_finds_what_the_tokens_show_and_what_they_do_not():
    rng = np.random.default_rng(4)
    names = ["t_amp_V2", "t_amp_V3", "t_sym_V2", "qt_ms"]
    result = fit_measurement_probe(
        _measured_pages(rng, 400),
        {"val": _measured_pages(rng, 200), "test": _measured_pages(rng, 200)},
        names,
    )
    assert set(result.alphas) == set(names) and set(result.alphas.values()) <= set(MEASUREMENT_ALPHAS)
    for split in ("val", "test"):
        r2 = result.r2[split]
        assert list(r2) == names
        assert r2["t_amp_V2"] > 0.7 and r2["t_amp_V3"] > 0.7 and r2["qt_ms"] > 0.7
        assert r2["t_sym_V2"] < 0.05  # nothing of it on the page: no better than its mean
        families = result.by_family(split)
        assert set(families) == {"t_amp", "t_sym", "qt_ms"}
        assert families["t_amp"] == pytest.approx((r2["t_amp_V2"] + r2["t_amp_V3"]) / 2)


def test_the_measurement_probe_refuses_mismatched_or_unmeasured_columns():
    rng = np.random.default_rng(5)
    x, measures = _measured_pages(rng, 50)
    with pytest.raises(ValueError, match="expected"):
        fit_measurement_probe((x, measures), {}, ["t_amp_V2"])
    measures[:, 2] = np.nan
    with pytest.raises(ValueError, match="t_sym_V2 has fewer than three"):
        fit_measurement_probe((x, measures), {}, ["t_amp_V2", "t_amp_V3", "t_sym_V2", "qt_ms"])


def _interaction_cases(rng: np.random.Generator, n: int):
    """Half the cases answered by one token coordinate's sign times another's (no linear reader
    sees it) and a note that says nothing; the other half by the note's troponin alone."""
    x = rng.normal(size=(n, 3, 4))
    x[:, 0, 1] *= 3  # the two coordinates carry most of the variance: the top components
    x[:, 2, 3] *= 3
    page_says = (x[:, 0, 1] > 0) == (x[:, 2, 3] > 0)
    note_speaks = rng.random(n) < 0.5
    y = np.where(note_speaks, rng.random(n) < 0.5, page_says)
    clinical = np.column_stack([rng.uniform(30, 90, n), rng.random(n) < 0.5])
    notes = [
        f"chest pain. troponin {'raised' if label else 'negative'}." if speaks else "routine check."
        for label, speaks in zip(y, note_speaks, strict=True)
    ]
    return x, clinical, notes, y


def test_the_boosted_probe_reads_what_a_linear_probe_cannot_and_uses_the_note():
    rng = np.random.default_rng(6)
    train, test = _interaction_cases(rng, 1500), _interaction_cases(rng, 800)
    linear = fit_probe((train[0], train[3]), (test[0], test[3]), {"test": (test[0], test[3])}, n_boot=0)
    with_note = fit_boosted_probe(train, {"test": test}, n_boot=200)["test"]
    without = fit_boosted_probe(train, {"test": test}, with_note=False, n_boot=0)["test"]
    assert linear.metrics["test"].auroc.value < 0.6  # the interaction is invisible to a linear reader
    assert 0.6 < without.accuracy.value < 0.8  # the booster reads the page's half off its components
    assert with_note.accuracy.value > 0.88  # and the note's half off its flags
    assert with_note.n == 800 and with_note.accuracy.low < with_note.accuracy.value < with_note.accuracy.high


def test_the_boosted_probe_refuses_a_training_split_with_one_class():
    rng = np.random.default_rng(7)
    x, clinical, notes, y = _interaction_cases(rng, 20)
    with pytest.raises(ValueError, match="ischemic and non-ischemic"):
        fit_boosted_probe((x, clinical, notes, np.ones(20, dtype=bool)), {})
