"""Reading a record's files safely: confined to the folder the user named, regular files only, bounded.

Takes a path (and the real path of the folder it must stay in); gives the file's bytes
(:func:`read_bytes`) or a header's decoded text (:func:`read_text`), or raises
:class:`~ecg_r1.data.readers.records.RecordError` with a quarantine reason. Every file a record
reads (header, signal files, annotation files) goes through :func:`read_bytes`: the WFDB header,
signal and annotation readers (``wfdb_header``, ``wfdb_signal``, ``wfdb_annotations``) import it
from here, and this module imports none of them.
"""

from __future__ import annotations

import codecs
import errno
import os
import stat

from ecg_r1.data.readers.records import FILE_TOO_LARGE, NOT_A_REGULAR_FILE, PATH_ESCAPES_FOLDER, RecordError

# Largest header and signal file read (a 10 s 12-lead record is about 120 kB; a header a few kB).
MAX_HEADER_BYTES = 1 << 20
MAX_SIGNAL_FILE_BYTES = 256 << 20


def read_bytes(
    path: str | os.PathLike[str], root: str | None = None, max_bytes: int = MAX_SIGNAL_FILE_BYTES
) -> bytes:
    """A record file's whole bytes, read only when it is a regular file inside ``root``.

    Confinement: neither a link nor a name written in a header can pull in a file from elsewhere
    on the machine; a file that is (or, through links, resolves to) anything outside ``root`` is
    refused unopened. Only regular files are read (a FIFO would block the run for ever, a device
    such as ``/dev/zero`` never ends), and ``max_bytes`` bounds what one file may cost. Messages
    name the path, never the file's contents. The file is opened by :func:`_open_confined`.

    Speed: one ``os.read`` of the file's size; measured here (``benchmarks/bench_ingest.py``
    folder) 36 µs for a 120 kB signal file and 15 µs for a header, against 65 µs and 42 µs for
    ``Path.read_bytes`` (its buffered file object costs more to set up than the read itself).

    Args:
        path: the file.
        root: real path (``os.path.realpath``) of the folder the file must stay in; None: the
            real path of the file's own folder.
        max_bytes: the largest file accepted.

    Raises:
        RecordError: ``path_escapes_folder``, ``not_a_regular_file`` or ``file_too_large``.
        FileNotFoundError: when the file does not exist.
    """
    path = os.fspath(path)
    if root is None:
        root = os.path.realpath(os.path.dirname(path) or ".")
    fd = _open_confined(path, root)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise RecordError(
                NOT_A_REGULAR_FILE,
                f"{path} is not a regular file (a folder, pipe, socket or device); a record's files must be "
                "plain files: replace it with the file itself",
            )
        size = status.st_size
        if size > max_bytes:
            raise RecordError(
                FILE_TOO_LARGE,
                f"{path} has {size} bytes, more than the {max_bytes} a record file may have here; an ECG of "
                "a few minutes is far smaller: check that it is the right file, or cut the record",
            )
        data = os.read(fd, size + 1)  # +1 so that a file grown since fstat is still seen to grow
        if len(data) <= size:
            return data
        chunks = [data]
        total = len(data)
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise RecordError(FILE_TOO_LARGE, f"{path} grew past {max_bytes} bytes while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)


# Flags of every open here. O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
# writer (its type is then refused on the descriptor); O_NOFOLLOW: a link is never opened as the
# file, it is resolved and checked first (:func:`_open_resolved`).
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_confined(path: str, root: str) -> int:
    """A descriptor of ``path``, opened for reading, when it lies inside ``root``.

    The usual file (a plain name under ``root``, no link on the way) is opened by
    :func:`_open_beneath`, which needs no path resolution; anything else (a link, a path that
    does not spell out ``root``, a missing file) by :func:`_open_resolved`, which resolves it.
    """
    fd = _open_beneath(path, root)
    return fd if fd is not None else _open_resolved(path, root)


def _open_beneath(path: str, root: str) -> int | None:
    """Open ``path`` one component at a time from ``root``, following no link; None when that fails.

    Each component is opened relative to the folder descriptor before it with ``O_NOFOLLOW``, so
    what is opened is the file the components name inside ``root`` at that moment, whatever is
    swapped in around it: no link is followed, and no name climbs out (``..`` and ``.`` are left
    to :func:`_open_resolved`). A link on the way (which may be a legitimate one inside the folder),
    a missing file or a path given other than under ``root`` gives None.
    """
    absolute = path if os.path.isabs(path) else os.path.abspath(path)
    prefix = root.rstrip("/") + "/"
    if not absolute.startswith(prefix):
        return None
    *folders, name = absolute[len(prefix) :].split("/")
    if any(part in ("", ".", "..") for part in (*folders, name)):
        return None
    try:
        folder = os.open(root, _DIR_FLAGS)
    except OSError:
        return None
    try:
        for part in folders:
            inner = os.open(part, _DIR_FLAGS, dir_fd=folder)
            os.close(folder)
            folder = inner
        return os.open(name, _OPEN_FLAGS, dir_fd=folder)
    except OSError:
        return None
    finally:
        os.close(folder)


def _open_resolved(path: str, root: str) -> int:
    """Resolve ``path`` (links included), refuse it unopened when it lands outside ``root``, open it.

    The check and the open are two steps, so the open itself does not follow a link in the last
    component and the file type is checked on the opened descriptor (by :func:`read_bytes`): a
    link or a FIFO put in the file's place between them is refused too. (A folder higher up the
    path swapped for a link in that moment is not caught; it needs someone writing into the folder
    during ingest, and only the paths :func:`_open_beneath` cannot open come here.)
    """
    real = os.path.realpath(path)
    if os.path.commonpath((real, root)) != root:
        raise RecordError(
            PATH_ESCAPES_FOLDER,
            f"{path} resolves to {real}, outside the folder {root} given to ingest; a record may only read "
            "files inside that folder: copy the file into it (links pointing outside are not followed)",
        )
    try:
        return os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise RecordError(
            PATH_ESCAPES_FOLDER,
            f"{path} is a link that does not resolve to a file inside the folder {root} (a loop of links, "
            "or a link put in its place while it was read); a record may only read files inside that "
            "folder: replace the link with the file itself",
        ) from exc


def read_text(path: str | os.PathLike[str], root: str | None = None) -> tuple[str, str]:
    """Read a header as UTF-8, falling back to Windows-1252/Latin-1 for legacy exports.

    Confined to ``root`` as :func:`read_bytes` is, and at most :data:`MAX_HEADER_BYTES`.

    Returns:
        (text, encoding used).
    """
    data = read_bytes(path, root, MAX_HEADER_BYTES)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]  # some Windows editors write one; it is not content
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        # cp1252 first: hospital systems on Windows write it; latin-1 decodes any byte.
        try:
            return data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            return data.decode("latin-1"), "latin-1"
