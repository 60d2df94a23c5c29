"""The note words a split holds that no training note does (the language part of a cross-hospital drop)."""

from __future__ import annotations

import pytest

from ecg_r1.evaluation.note_shift import note_shift
from ecg_r1.evaluation.report import note_shift_markdown
from ecg_r1.modeling.notes import note_words

TRAINING = [
    "69-year-old man. Risk factors: type 2 diabetes, never smoked. K+ 3.9 mmol/L.",
    "F 77. HTN. DM-. no CAD hx. trop 3 ng/L (normal).",
    None,
]


def test_words_are_lower_cased_and_a_missing_note_has_none():
    assert note_words("Troponin NEGATIVE, K+ 4.1") == ["troponin", "negative"]
    assert note_words(None) == [] and note_words("") == []


def test_notes_in_the_training_words_have_no_unseen_word():
    shift = note_shift(TRAINING, ["Man, never smoked; diabetes.", "trop normal"])
    assert (shift.notes, shift.words) == (2, 6)
    assert shift.unseen_words == 0.0 and shift.notes_with_unseen == 0.0
    assert shift.examples == ()


def test_a_note_in_another_language_is_counted_word_by_word():
    german = "69-jähriger Patient. Risikofaktoren: kein Diabetes. Kalium 4,7 mmol/l."
    shift = note_shift(TRAINING, [german, "never smoked", None, ""])
    # jähriger, patient, risikofaktoren, kein, kalium unseen; diabetes, mmol seen, "l" is not a word.
    assert shift.notes == 2
    assert shift.words == 7 + 2
    assert shift.unseen_words == pytest.approx(5 / 9)
    assert shift.notes_with_unseen == pytest.approx(1 / 2)
    assert shift.unreadable_notes == pytest.approx(1 / 2)  # 5 of the German note's 7 words are unseen
    assert set(shift.examples) == {"jähriger", "patient", "risikofaktoren", "kein", "kalium"}


def test_examples_are_the_most_frequent_unseen_words_first():
    shift = note_shift(["chest pain"], ["kein kein kein schmerz schmerz ab cd ef gh"])
    assert shift.examples[:2] == ("kein", "schmerz")
    assert len(shift.examples) == 5


def test_a_split_without_note_words_reads_zero():
    shift = note_shift(TRAINING, [None, "", "4.5 / 3"])
    assert (shift.notes, shift.words) == (0, 0)
    assert shift.unseen_words == shift.notes_with_unseen == shift.unreadable_notes == 0.0


def test_the_markdown_names_each_split_and_its_shares():
    text = note_shift_markdown(
        {
            "test_internal": note_shift(TRAINING, ["never smoked"]),
            "test_external": note_shift(TRAINING, ["kein Diabetes", "kein Diabetes bekannt"]),
        }
    )
    assert "| internal test | 1 | 2 | 0.0% | 0.0% | 0.0% | — |" in text
    assert "| cross-hospital | 2 | 5 | 60.0% | 100.0% | 50.0% | kein, bekannt |" in text
    assert note_shift_markdown({}) == ""
