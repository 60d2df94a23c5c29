"""DVC data versions and git commits (ecg_r1.tracking.versioning), in a throw-away git repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ecg_r1.tracking.versioning import (
    DvcError,
    data_version,
    dvc_executable,
    ensure_dvc_repo,
    git_commit,
    pull_data,
    track_data,
)


def _dvc_or_skip() -> str:
    try:
        return dvc_executable()
    except DvcError as error:
        pytest.skip(f"dvc is not installed: {error}")


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    _dvc_or_skip()
    root = tmp_path / "project"
    root.mkdir()
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "test@example.org")
    _git(root, "config", "user.name", "test")
    (root / "data" / "cohort").mkdir(parents=True)
    (root / "data" / "cohort" / "cohort.parquet").write_bytes(b"version one")
    return root


class TestDvcExecutable:
    def test_env_var_wins(self, monkeypatch, tmp_path):
        fake = tmp_path / "mydvc"
        fake.write_text("#!/bin/sh\n")
        monkeypatch.setenv("ECG_R1_DVC", str(fake))
        assert dvc_executable() == str(fake)

    def test_env_var_naming_nothing_is_a_clear_error(self, monkeypatch, tmp_path):
        monkeypatch.setenv("ECG_R1_DVC", str(tmp_path / "absent"))
        with pytest.raises(DvcError, match="does not name a file"):
            dvc_executable()

    def test_missing_dvc_says_run_make_setup(self, monkeypatch, tmp_path):
        monkeypatch.delenv("ECG_R1_DVC", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))
        monkeypatch.setattr("ecg_r1.tracking.versioning.REPO_ROOT", tmp_path)
        with pytest.raises(DvcError, match="make setup"):
            dvc_executable(tmp_path)

    def test_project_venv_is_found(self, monkeypatch, tmp_path):
        monkeypatch.delenv("ECG_R1_DVC", raising=False)
        exe = tmp_path / ".venv-dvc" / "bin" / "dvc"
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\n")
        assert dvc_executable(tmp_path) == str(exe)


@pytest.mark.slow  # runs dvc in a scratch repository
class TestDataVersion:
    def test_untracked_data_has_no_version(self, tmp_path):
        assert data_version(tmp_path) is None

    def test_version_changes_with_data_and_pull_restores_it(self, repo):
        remote = ensure_dvc_repo(repo)
        assert remote == "local"
        assert (repo / ".dvc-storage").is_dir()
        # stored relative to .dvc/config, so the checkout can move
        assert "../.dvc-storage" in (repo / ".dvc" / "config").read_text()

        first = track_data(repo)
        assert first == data_version(repo)
        assert first.endswith(".dir") and len(first) == 36
        assert "/data" in (repo / ".gitignore").read_text()
        assert any((repo / ".dvc-storage").rglob("*")), "dvc push put nothing in the remote"

        (repo / "data" / "cohort" / "cohort.parquet").write_bytes(b"version two")
        second = track_data(repo, push=False)
        assert second != first
        # the same content gives the same version
        (repo / "data" / "cohort" / "cohort.parquet").write_bytes(b"version one")
        assert track_data(repo, push=False) == first

        # lose the workspace and the local cache: pull must fetch version one from the remote
        shutil.rmtree(repo / "data")
        shutil.rmtree(repo / ".dvc" / "cache")
        pull_data(repo)
        assert (repo / "data" / "cohort" / "cohort.parquet").read_bytes() == b"version one"

    def test_final_models_are_versioned_and_checkpoints_are_not(self, repo):
        import json

        model = repo / "data" / "models" / "sft_model"
        (model / "model").mkdir(parents=True)
        (model / "model" / "model.safetensors").write_bytes(b"final weights")
        (model / "checkpoints" / "checkpoint-50").mkdir(parents=True)
        (model / "checkpoints" / "checkpoint-50" / "optimizer.pt").write_bytes(b"optimizer state")
        version = track_data(repo, push=False)
        manifest = repo / ".dvc" / "cache" / "files" / "md5" / version[:2] / version[2:]
        files = {entry["relpath"] for entry in json.loads(manifest.read_text())}
        assert "models/sft_model/model/model.safetensors" in files
        assert "cohort/cohort.parquet" in files
        assert not any("checkpoints" in name for name in files)
        # the checkpoint changing (a resumed run) is no new data version
        (model / "checkpoints" / "checkpoint-50" / "optimizer.pt").write_bytes(b"later state")
        assert track_data(repo, push=False) == version
        track_data(repo, push=False)
        assert (repo / ".dvcignore").read_text().count("checkpoints/") == 1

    def test_configured_remote_is_kept(self, repo, tmp_path):
        elsewhere = tmp_path / "shared-remote"
        ensure_dvc_repo(repo, remote_dir=elsewhere)
        assert elsewhere.is_dir()
        # a second call (e.g. on every materialization) leaves the configured default alone
        assert ensure_dvc_repo(repo) == "local"
        assert str(elsewhere) in (repo / ".dvc" / "config").read_text()
        assert not (repo / ".dvc-storage").exists()

    def test_tracking_without_data_folder_is_a_clear_error(self, repo):
        shutil.rmtree(repo / "data")
        with pytest.raises(DvcError, match="materialize the data assets"):
            track_data(repo)


class TestGitCommit:
    def test_commit_is_reported_after_the_first_commit(self, repo):
        assert git_commit(repo) is None  # no commit yet
        (repo / "README.md").write_text("x")
        _git(repo, "add", "README.md")
        _git(repo, "commit", "-q", "-m", "first")
        assert git_commit(repo) == _git(repo, "rev-parse", "HEAD")

    def test_outside_git_is_none(self, tmp_path):
        assert git_commit(tmp_path) is None

    @pytest.mark.slow  # runs dvc itself: about 5 s
    def test_the_pipelines_own_dvc_add_does_not_make_the_commit_dirty(self, repo):
        """A fresh clone's first run: ``dvc add`` rewrites the committed data.dvc; the code is clean."""
        ensure_dvc_repo(repo)
        track_data(repo, push=False)
        (repo / "code.py").write_text("x = 1\n")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "code and data version one")
        head = _git(repo, "rev-parse", "HEAD")
        (repo / "data" / "cohort" / "cohort.parquet").write_bytes(b"version two")
        track_data(repo, push=False)
        assert _git(repo, "status", "--porcelain", "--untracked-files=no") == "M data.dvc"
        assert git_commit(repo) == head
        (repo / "code.py").write_text("x = 2\n")  # a change to the code still counts
        assert git_commit(repo) == f"{head}-dirty"
