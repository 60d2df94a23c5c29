"""How foreign a split's notes are to the models: the share of their words no training note holds.

A model that learned its words from the training hospitals' notes cannot read a note written in
others (the default cohort's held-out hospital writes German): its accuracy there says little
about the ECG and much about the language. The comparison reports, per evaluated split, how many
of the notes' words never occur in a training note, beside each model's no-note row, so a reader
sees which part of a cross-hospital drop is language. Words are those of
:func:`ecg_r1.modeling.notes.note_words` (two or more letters, lower-cased: a number no training
note holds is a new value, not a foreign word), the words ``model.unseen_note_words: mark`` marks;
and how many notes that setting shows with every word marked, as unreadable
(:func:`ecg_r1.modeling.notes.is_unreadable`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ecg_r1.modeling.notes import is_unreadable, note_vocabulary, note_words


@dataclass(frozen=True)
class NoteShift:
    """The notes of one split against the training notes' vocabulary.

    Attributes:
        notes: notes with at least one word.
        words: their words, counted with repeats.
        unseen_words: the share of those words that no training note contains.
        notes_with_unseen: the share of notes holding at least one such word.
        unreadable_notes: the share of notes with most of their words unseen, which
            ``model.unseen_note_words: mark`` shows with every word marked.
        examples: up to five of the most frequent unseen words, most frequent first.
    """

    notes: int
    words: int
    unseen_words: float
    notes_with_unseen: float
    unreadable_notes: float
    examples: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"examples": list(self.examples)}


def note_shift(training_notes: Iterable[str | None], notes: Iterable[str | None]) -> NoteShift:
    """How many of ``notes``' words the training notes never use.

    Args:
        training_notes: the notes of the cases the models were trained on.
        notes: the notes of the split to describe.

    Returns:
        A :class:`NoteShift`; its shares are 0.0 when the split has no note words.
    """
    vocabulary = note_vocabulary(training_notes)
    counts: dict[str, int] = {}
    n_notes = n_words = n_unseen = n_notes_unseen = n_unreadable = 0
    for note in notes:
        words = note_words(note)
        if not words:
            continue
        unseen = [word for word in words if word not in vocabulary]
        n_notes += 1
        n_words += len(words)
        n_unseen += len(unseen)
        n_notes_unseen += bool(unseen)
        n_unreadable += is_unreadable(note, vocabulary)
        for word in unseen:
            counts[word] = counts.get(word, 0) + 1
    examples = tuple(sorted(counts, key=lambda word: (-counts[word], word))[:5])
    return NoteShift(
        notes=n_notes,
        words=n_words,
        unseen_words=n_unseen / n_words if n_words else 0.0,
        notes_with_unseen=n_notes_unseen / n_notes if n_notes else 0.0,
        unreadable_notes=n_unreadable / n_notes if n_notes else 0.0,
        examples=examples,
    )
