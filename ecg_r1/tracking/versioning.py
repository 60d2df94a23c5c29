"""Data and code versions: DVC for ``data/``, git for the code.

DVC runs as a command-line tool from its own virtual environment (``.venv-dvc``, made by
``make setup``): dvc and dagster cannot share one environment (their antlr4 runtimes clash). The DVC repository is the project root; ``data/`` is tracked as one directory by
``data.dvc``, and the **data version** is the md5 DVC writes there (``<md5>.dir``): it changes
whenever any file under ``data/`` changes, and ``dvc pull`` at a commit restores exactly that data.

The default remote is a local folder, ``.dvc-storage/`` in the project root. Another remote is one
line, for example S3 (needs ``dvc[s3]`` in the dvc environment)::

    .venv-dvc/bin/dvc remote add -d storage s3://my-bucket/ecg-r1

:func:`ensure_dvc_repo` leaves a configured default remote alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from ecg_r1.constants import REPO_ROOT

logger = logging.getLogger(__name__)

DVC_ENV_VAR = "ECG_R1_DVC"
DEFAULT_REMOTE_NAME = "local"
DEFAULT_REMOTE_DIR = ".dvc-storage"
DATA_DIR = "data"
# What DVC never versions under data/ (gitignore patterns in the root's .dvcignore): the trainers'
# checkpoint folders (weights, optimizer and RNG states of every saved step: tens of GB a stage of
# a GPU profile). Cohorts, splits, images and the final model folders are versioned.
DVC_IGNORED = ("checkpoints/",)


class DvcError(RuntimeError):
    """DVC is missing or one of its commands failed; the message says what to do."""


def dvc_executable(repo_root: str | Path | None = None) -> str:
    """Find the dvc command.

    Looks at the ``ECG_R1_DVC`` environment variable, then ``<repo>/.venv-dvc/bin/dvc``, then
    ``dvc`` on the PATH.

    Args:
        repo_root: the project root to look for ``.venv-dvc`` in (default: this checkout's root).

    Returns:
        The path of the dvc executable.

    Raises:
        DvcError: when none is found (run ``make setup``).
    """
    configured = os.environ.get(DVC_ENV_VAR)
    if configured:
        if not Path(configured).is_file():
            raise DvcError(f"{DVC_ENV_VAR}={configured} does not name a file; point it at a dvc executable")
        return configured
    roots = [Path(repo_root)] if repo_root is not None else []
    roots.append(REPO_ROOT)
    for root in roots:
        candidate = root / ".venv-dvc" / "bin" / "dvc"
        if candidate.is_file():
            return str(candidate)
    on_path = shutil.which("dvc")
    if on_path:
        return on_path
    raise DvcError(
        "dvc not found: run `make setup` (it creates .venv-dvc with dvc), "
        f"or set {DVC_ENV_VAR} to a dvc executable"
    )


def _run_dvc(repo_root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [dvc_executable(repo_root), *args]
    # No analytics: machines here (and many hospital networks) have no internet, and DVC would wait on it.
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    logger.debug("running %s in %s", " ".join(command), repo_root)
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise DvcError(
            f"`dvc {' '.join(args)}` failed in {repo_root} (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}"
        )
    return done


def ensure_dvc_repo(repo_root: str | Path, remote_dir: str | Path | None = None) -> str:
    """Make ``repo_root`` a DVC repository with a default remote, if it is not one already.

    Runs ``dvc init`` (``--no-scm`` outside a git repository) when there is no ``.dvc/`` and adds a
    local default remote when none is configured; a configured default remote (S3, ...) is kept.

    Args:
        repo_root: the project root (holding ``data/``).
        remote_dir: the local remote's folder (default ``<repo_root>/.dvc-storage``); written to
            the DVC config relative to the root when it lies inside it, so the checkout can move.

    Returns:
        The name of the default remote.
    """
    root = Path(repo_root).resolve()
    if not (root / ".dvc").is_dir():
        args = ["init", "-q"] if (root / ".git").exists() else ["init", "-q", "--no-scm"]
        _run_dvc(root, *args)
        logger.info("initialised DVC in %s", root)
    current = _run_dvc(root, "remote", "default", check=False)
    if current.returncode == 0 and current.stdout.strip():
        return current.stdout.strip()
    remote = Path(remote_dir) if remote_dir is not None else root / DEFAULT_REMOTE_DIR
    remote = remote if remote.is_absolute() else root / remote
    remote.mkdir(parents=True, exist_ok=True)
    # dvc resolves a relative url against the working directory (the root) and stores it relative
    # to .dvc/config, so the repository keeps working when moved.
    url = os.path.relpath(remote, root) if remote.is_relative_to(root) else str(remote)
    _run_dvc(root, "remote", "add", "-d", "-f", DEFAULT_REMOTE_NAME, url)
    logger.info("DVC default remote %r -> %s", DEFAULT_REMOTE_NAME, remote)
    return DEFAULT_REMOTE_NAME


def track_data(repo_root: str | Path, data_dir: str = DATA_DIR, push: bool = True) -> str:
    """Record the current ``data/`` as a new DVC version and push it to the default remote.

    Runs ``dvc add data`` (writes ``data.dvc``; DVC also puts ``/data`` in ``.gitignore``) and
    ``dvc push``. Commit ``data.dvc`` with git to tie the data version to the code.

    Args:
        repo_root: the project root (a DVC repository, see :func:`ensure_dvc_repo`).
        data_dir: the tracked folder, relative to the root.
        push: also upload the data to the default remote.

    Returns:
        The data version: the md5 in ``data.dvc``.

    Raises:
        DvcError: when the data folder is missing or a dvc command fails.
    """
    root = Path(repo_root).resolve()
    if not (root / data_dir).is_dir():
        raise DvcError(f"no {data_dir}/ folder in {root}: materialize the data assets before tracking them")
    if not (root / ".dvc").is_dir():
        ensure_dvc_repo(root)
    ignore_checkpoints(root)
    # Several Dagster steps may track at once; wait for DVC's repository lock instead of failing.
    _run_dvc(root, "--wait-for-lock", "add", "-q", data_dir)
    if push:
        _run_dvc(root, "--wait-for-lock", "push", "-q", f"{data_dir}.dvc")
    version = data_version(root, data_dir)
    if version is None:  # pragma: no cover - dvc add always writes the .dvc file
        raise DvcError(f"dvc add did not write {data_dir}.dvc in {root}")
    logger.info("data version %s", version)
    return version


def ignore_checkpoints(repo_root: str | Path) -> None:
    """Add :data:`DVC_IGNORED` to the repository's ``.dvcignore`` (kept as it is otherwise)."""
    path = Path(repo_root) / ".dvcignore"
    text = path.read_text() if path.is_file() else ""
    missing = [pattern for pattern in DVC_IGNORED if pattern not in text.splitlines()]
    if missing:
        lead = "" if not text or text.endswith("\n") else "\n"
        path.write_text(
            text
            + lead
            + "# trainer checkpoints are not versioned (ecg_r1.tracking.versioning)\n"
            + "\n".join(missing)
            + "\n"
        )


def pull_data(repo_root: str | Path, data_dir: str = DATA_DIR) -> None:
    """Restore ``data/`` to the version in ``data.dvc`` from the DVC cache or remote (``dvc pull``)."""
    root = Path(repo_root).resolve()
    _run_dvc(root, "--wait-for-lock", "pull", "-q", f"{data_dir}.dvc")


def data_version(repo_root: str | Path, data_dir: str = DATA_DIR) -> str | None:
    """Return the data version DVC recorded for ``data_dir``: the md5 in ``<data_dir>.dvc``, else a
    digest of the ``dvc.lock`` outputs under it.

    Reads the files only (no dvc process), so it is cheap enough for every asset's metadata. The
    version is that of the last :func:`track_data`, not of uncommitted changes since.

    Returns:
        The md5 (``<hex>.dir`` for a folder), or None when DVC does not track the data.
    """
    root = Path(repo_root)
    path = root / f"{data_dir}.dvc"
    if path.is_file():
        for out in (yaml.safe_load(path.read_text()) or {}).get("outs") or []:
            if out.get("md5"):
                return str(out["md5"])
    lock = root / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
        digests = sorted(
            f"{out['path']}:{out['md5']}"
            for stage in stages.values()
            for out in stage.get("outs") or []
            if str(out.get("path", "")).startswith(data_dir) and out.get("md5")
        )
        if digests:
            return hashlib.md5("\n".join(digests).encode()).hexdigest()
    return None


def git_commit(repo_root: str | Path, data_dir: str = DATA_DIR) -> str | None:
    """Return the checked-out git commit of ``repo_root``, ``-dirty`` when tracked files have changed;
    None outside git or before the first commit.

    ``<data_dir>.dvc`` does not count: the pipeline's own ``dvc add`` (:func:`track_data`) rewrites
    it before training, so every run of a fresh clone would record ``-dirty`` although the code is
    the commit's. The data version it holds is recorded apart (:func:`data_version`).
    """
    if shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=20,
        )
        if done.returncode != 0 or not done.stdout.strip():
            return None
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":/",
                f":(top,exclude){data_dir}.dvc",
            ],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    head = done.stdout.strip()
    return f"{head}-dirty" if dirty else head


def provenance(repo_root: str | Path, data_dir: str = DATA_DIR) -> dict[str, str]:
    """What every run and asset records as its origin: the git commit (:func:`git_commit`, else
    ``"unknown"``) and the DVC data version (:func:`data_version`, else ``"untracked"``)."""
    return {
        "git_commit": git_commit(repo_root, data_dir) or "unknown",
        "data_version": data_version(repo_root, data_dir) or "untracked",
    }
