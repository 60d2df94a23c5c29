"""Resources of the ECG-R1 code location; the one place they are wired (see :func:`resources`).

* :class:`DataLayout`: where the data lives. Every path is relative to ``home`` unless absolute;
  ``home`` defaults to ``$ECG_R1_HOME`` or the repository root.
* :class:`DvcResource`: records the DVC data version (and the git commit) of what an asset wrote.
* :class:`MlflowResource`: points MLflow at the project's store (``mlflow/mlflow.db``, a SQLite
  store so the model registry works) and links runs for the UI.
"""

import os
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from ecg_r1.constants import REPO_ROOT
from ecg_r1.tracking import versioning
from ecg_r1.tracking.runs import MLFLOW_URI_ENV_VAR

HOME_ENV_VAR = "ECG_R1_HOME"


def default_home() -> Path:
    """``$ECG_R1_HOME`` when set, else the repository root."""
    return Path(os.environ.get(HOME_ENV_VAR) or REPO_ROOT).resolve()


class DataLayout(dg.ConfigurableResource):
    """The data folders of the pipeline (the repository's ``data/``, tracked by DVC)."""

    home: str = Field(default="", description=f"Project root; empty: ${HOME_ENV_VAR} or the repository root.")
    data_dir: str = Field(default="data", description="The DVC-tracked data folder.")
    simulated_dir: str = Field(
        default="data/raw/simulated", description="Simulator output (WFDB + manifest)."
    )
    cohort_dir: str = Field(default="data/cohort", description="Ingested and validated cohort folder.")
    splits_dir: str = Field(default="data/splits", description="Split manifest folder.")
    images_dir: str = Field(default="data/images", description="Rendered ECG images.")
    models_dir: str = Field(default="data/models", description="Tokenizer, base model and adapters.")

    @property
    def root(self) -> Path:
        return Path(self.home).resolve() if self.home else default_home()

    def path(self, relative: str) -> Path:
        """Resolve a configured path against the project root (absolute paths are kept)."""
        path = Path(relative).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def data(self) -> Path:
        return self.path(self.data_dir)

    @property
    def simulated(self) -> Path:
        return self.path(self.simulated_dir)

    @property
    def cohort(self) -> Path:
        return self.path(self.cohort_dir)

    @property
    def splits(self) -> Path:
        return self.path(self.splits_dir)

    @property
    def images(self) -> Path:
        return self.path(self.images_dir)

    @property
    def models(self) -> Path:
        return self.path(self.models_dir)


class DvcResource(dg.ConfigurableResource):
    """DVC, run as a command from its own environment (``.venv-dvc``, see ``ecg_r1.tracking.versioning``).

    With ``track`` on, :meth:`record` runs ``dvc add`` (and ``dvc push`` with ``push``) on the data
    folder after an asset wrote into it, so the version in the asset's metadata is the version
    that holds its output. With ``track`` off it only reads the version last recorded in
    ``data.dvc``.
    """

    home: str = Field(
        default="", description=f"DVC repository root; empty: ${HOME_ENV_VAR} or the repository root."
    )
    data_dir: str = Field(default=versioning.DATA_DIR, description="Tracked folder, relative to the root.")
    remote_dir: str = Field(
        default="",
        description="Local remote folder used when no default remote is configured; empty: .dvc-storage/. "
        "For S3: `dvc remote add -d storage s3://bucket/path` once, and it is kept.",
    )
    track: bool = Field(default=True, description="Run dvc add after each data asset.")
    push: bool = Field(default=True, description="Push each new version to the default remote.")

    @property
    def root(self) -> Path:
        return Path(self.home).resolve() if self.home else default_home()

    def version(self) -> str | None:
        """The data version recorded in ``data.dvc`` (None before the first track)."""
        return versioning.data_version(self.root, self.data_dir)

    def record(self) -> dict[str, Any]:
        """Track the data folder (when enabled) and return flat metadata: data version and code commit.

        ``versioning.track_data`` logs the version; Dagster shows ``ecg_r1``'s log lines in the run
        (``python_logs.managed_python_loggers`` in ``$DAGSTER_HOME/dagster.yaml``)."""
        if self.track:
            versioning.ensure_dvc_repo(self.root, self.remote_dir or None)
            version = versioning.track_data(self.root, self.data_dir, push=self.push)
        else:
            version = self.version()
        # The code's commit (this checkout), which may differ from the data's home.
        code = versioning.provenance(REPO_ROOT)
        return {"data_version": version or "untracked", "git_commit": code["git_commit"]}


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and registry (our own thin resource: dagster-mlflow closes its run early)."""

    home: str = Field(default="", description=f"Project root; empty: ${HOME_ENV_VAR} or the repository root.")
    tracking_uri: str = Field(
        default="",
        description=f"Tracking/registry URI (e.g. http://mlflow-host:5000); empty: ${MLFLOW_URI_ENV_VAR}, "
        "else the sqlite store under <home>/mlflow/.",
    )
    ui_url: str = Field(default="http://127.0.0.1:5000", description="Where `make mlflow-ui` serves the UI.")

    @property
    def root(self) -> Path:
        return Path(self.home).resolve() if self.home else default_home()

    def configure(self) -> str:
        """Point this process (and its children) at the store; returns the tracking URI."""
        from ecg_r1.tracking import runs as tracking

        # The stack's workers get the server from the environment (.stack/env), so one set of
        # definitions serves the embedded store and the shared server.
        return tracking.configure_store(self.root, self.tracking_uri)

    def run_url(self, run_id: str | None) -> str:
        """Link to a run in the MLflow UI (served by `make mlflow-ui`)."""
        if not run_id:
            return "none"
        from mlflow import MlflowClient

        experiment_id = MlflowClient().get_run(run_id).info.experiment_id
        return f"{self.ui_url}/#/experiments/{experiment_id}/runs/{run_id}"


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={"layout": DataLayout(), "dvc": DvcResource(), "mlflow": MlflowResource()}
    )
