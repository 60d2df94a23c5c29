"""Output folders: checking the one a user names, and writing one whole before it replaces the old.

:func:`check_out_folder` refuses an output folder that is an existing file or lies inside one
(``ecg-r1 ingest DATA --out notes.txt`` must not replace ``notes.txt`` with a cohort); every
command writing an ``--out`` folder calls it before it writes anything. :func:`staged_folder`
gives a folder beside the output to write into and renames it into place only when the writer
finishes, so an interrupted run leaves the old output as it was; the folder it makes follows the
umask, as any folder the user makes does (``tempfile.mkdtemp``'s are 0700, and that mode
survives the rename: a cohort nobody else on a shared server could read).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


class OutFolderError(ValueError):
    """An output folder that cannot be written without losing a file; the message says why."""


def check_out_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path when it is an existing folder or can become one; nothing is created.

    Raises:
        OutFolderError: when ``path``, or a folder above it, exists and is not a folder.
    """
    path = Path(path)
    for place in (path, *path.parents):
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                what = "is" if place == path else f"would be inside {place}, which is"
                raise OutFolderError(
                    f"the output folder {path} {what} an existing file, which would be lost: "
                    "give the path of a new or an existing folder"
                )
            break
    return path


@contextlib.contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A new folder beside ``out_dir`` to write into, put in place of ``out_dir`` on success.

    On leaving the block normally the staged folder replaces ``out_dir`` by two renames, so
    ``out_dir`` is the old content or the new at every moment (a crash between them leaves the
    old one as ``.<name>.old-*``); on an exception the staged folder is removed and ``out_dir``
    stays as it was. The caller holds whatever lock keeps two writers apart.
    """
    work = _new_folder(out_dir, "partial")
    try:
        yield work
        if out_dir.exists():
            old = _new_folder(out_dir, "old")
            os.replace(out_dir, old / out_dir.name)
            os.replace(work, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already when the rename succeeded


def _new_folder(out_dir: Path, kind: str) -> Path:
    """A new, empty folder ``.<name>.<kind>-<random>`` beside ``out_dir``, of mode 0777 less the
    umask (``os.mkdir``'s default, unlike ``tempfile.mkdtemp``'s 0700)."""
    for _ in range(100):
        path = out_dir.parent / f".{out_dir.name}.{kind}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"cannot make a new folder beside {out_dir}: every name tried exists")
