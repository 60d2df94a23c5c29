"""The clinical note's vocabulary: the words of the training notes, and how a note in words no
training note holds is shown to the model (``model.unseen_note_words``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal, get_args

# Note words: runs of two or more letters (digits, units' symbols and single letters such as the
# "K" of "K+" are values and abbreviations, not vocabulary).
_NOTE_WORD_RE = re.compile(r"[^\W\d_]{2,}")

# What the model sees of the note words it never learned (``model.unseen_note_words``). "keep":
# the words as written. "mark": each word no training note holds becomes UNSEEN_WORD, so a note in
# another language reads as what it is to the model, a note of unknown words, and training can
# show that form exactly (``note_scramble`` then marks every word of the note).
UnseenNoteWords = Literal["keep", "mark"]
UNSEEN_NOTE_WORDS: tuple[str, ...] = get_args(UnseenNoteWords)
UNSEEN_WORD = "?"
# A note with more than this share of its words unseen is shown with every word marked, the form
# of a scrambled training note: the few words a foreign note shares with the training notes
# ("Diabetes", "PCI", "normal" in a German one) read out of their context turned the tiny models'
# answers to "No" at the held-out hospital (docs/research/tiny_recipe.md, the unreadable-note gate).
UNREADABLE_NOTE_SHARE = 0.5


def note_words(note: str | None) -> list[str]:
    """The words of a note, lower-cased, in order (none for a missing note)."""
    return [word.lower() for word in _NOTE_WORD_RE.findall(note)] if note else []


def note_vocabulary(notes: Iterable[str | None]) -> frozenset[str]:
    """Every word of the given notes (the training notes: what a model can have learned)."""
    return frozenset(word for note in notes for word in note_words(note))


def is_unreadable(note: str | None, vocabulary: frozenset[str] | set[str]) -> bool:
    """Whether more than :data:`UNREADABLE_NOTE_SHARE` of the note's words are outside ``vocabulary``
    (a note without words is not)."""
    words = note_words(note)
    return sum(word not in vocabulary for word in words) > UNREADABLE_NOTE_SHARE * len(words)


def mark_unseen_words(note: str | None, vocabulary: frozenset[str] | set[str]) -> str | None:
    """The note with each word outside ``vocabulary`` replaced by :data:`UNSEEN_WORD`, and every
    word replaced when the note :func:`is_unreadable`.

    Numbers, punctuation, single letters and layout are kept. With an empty vocabulary every word
    is marked: the training form of a note the model cannot read.
    """
    if not note:
        return note
    if is_unreadable(note, vocabulary):
        vocabulary = frozenset()
    return _NOTE_WORD_RE.sub(lambda m: m.group(0) if m.group(0).lower() in vocabulary else UNSEEN_WORD, note)
