"""Reading MIT-format annotation files (such as LUDB's per-lead delineations ``1.i`` ... ``1.v6``).

Takes an annotation file path (and the real path of the folder it must stay in); gives the
annotations' sample indices (int64) and symbols in file order. The file is read through
:func:`~ecg_r1.data.readers.confined_read.read_bytes`, so a refused file raises
:class:`~ecg_r1.data.readers.records.RecordError` as a header or signal file does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecg_r1.data.readers.confined_read import read_bytes

# MIT annotation codes used for ECG delineation (wfdb's ann_label_table).
_ANN_SYMBOLS = {1: "N", 24: "p", 27: "t", 39: "(", 40: ")"}
_SKIP, _NUM, _SUB, _CHN, _AUX = 59, 60, 61, 62, 63


def read_annotations(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read an MIT-format annotation file (such as LUDB's ``1.v1``).

    Much faster than ``wfdb.rdann`` for LUDB's small delineation files (which use a few codes
    after a leading SKIP); the tests check it against ``wfdb.rdann``.

    Args:
        path: the annotation file.

    Returns:
        (sample indices as int64, symbols) in file order.
    """
    samples, symbols = read_annotation_arrays(path)
    return samples, symbols.tolist()


_SYMBOL_TABLE = np.array([_ANN_SYMBOLS.get(code, f"<{code}>") for code in range(64)])


def read_annotation_arrays(path: str | Path, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_annotations` with the symbols as a numpy string array (for vectorised use).

    ``root`` confines the file as :func:`read_bytes` does (None: the file's own folder).
    """
    data = read_bytes(path, root)
    words = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2")
    # Leading SKIP words (LUDB files start with one) move the time origin.
    time = 0
    i = 0
    while i < len(words) and words[i] >> 10 == _SKIP:
        if i + 2 < len(words):
            interval = (int(words[i + 1]) << 16) | int(words[i + 2])
            time += interval - (1 << 32) if interval >= 1 << 31 else interval
        i += 3
    rest = words[i:]
    ends = np.flatnonzero(rest == 0)
    if len(ends):
        rest = rest[: ends[0]]
    codes = rest >> 10
    if not np.any(codes >= _SKIP):
        # Only plain annotations: each time is the running sum of the increments.
        samples = time + np.cumsum(rest & 0x3FF, dtype=np.int64)
        return samples, _SYMBOL_TABLE[codes]
    return _read_annotations_loop(words.tolist())


def _read_annotations_loop(word_list: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The general MIT annotation format (SKIP, AUX, NUM, SUB, CHN anywhere), word by word."""
    samples: list[int] = []
    codes: list[int] = []
    time = 0
    i = 0
    n = len(word_list)
    while i < n:
        word = word_list[i]
        code, value = word >> 10, word & 0x3FF
        i += 1
        if code == 0 and value == 0:
            break
        if code == _SKIP:
            # 32-bit interval in PDP-11 order: high word first.
            if i + 1 < n:
                interval = (word_list[i] << 16) | word_list[i + 1]
                if interval >= 1 << 31:
                    interval -= 1 << 32
                time += interval
            i += 2
        elif code == _AUX:
            i += (value + 1) // 2
        elif code in (_NUM, _SUB, _CHN):
            continue
        else:
            time += value
            samples.append(time)
            codes.append(code)
    return np.asarray(samples, dtype=np.int64), _SYMBOL_TABLE[np.asarray(codes, dtype=np.intp)]
