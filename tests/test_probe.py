"""The linear probe of a vision tower's tokens (ecg_r1.evaluation.probe)."""

import numpy as np
import pytest

from ecg_r1.evaluation.probe import DEFAULT_CS, NOTE_CS, fit_page_and_note_probe, fit_probe


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
