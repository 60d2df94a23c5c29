"""The UIs as a user sees them, in headless Chromium: the Dagster UI (``make ui``) and MLflow's
(``make mlflow-ui``), each started as the Makefile starts it, on a free loopback port, with its
state in pytest's tmp_path. Screenshots go to ``test-artifacts/`` (gitignored).

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); skipped with
the reason when they are absent.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import (
    REPO_ROOT,
    chromium_driver,
    free_port,
    require_chromium,
    running_server,
    save_screenshot,
    server_env,
    venv_tool,
    wait_for_http,
)

# The data assets every build of the code location has (the data layer); later stages add more.
DATA_ASSETS = ("simulated_raw", "raw_cohort", "validated_cohort", "cohort_splits")
# The cheapest asset without upstream: the simulator, at a size that runs in a second. DVC
# tracking is switched off for the run: the test's home is not a DVC repository worth versioning.
LAUNCHPAD_CONFIG = """\
ops:
  simulated_raw:
    config:
      n: 12
      hospitals: 4
      seed: 0
resources:
  dvc:
    config:
      track: false
"""
MODEL_NAMES = ("ecg-r1-sft", "ecg-r1-grpo")
SERVER_START_S = 240  # dg dev / mlflow ui start in ~10 s on an idle machine; CI may be loaded
RUN_TIMEOUT_S = 240


# ---------------------------------------------------------------- Selenium helpers


# Dialogs a fresh instance shows over the page, by app: Dagster's "Join the community" (Skip)
# and MLflow's "new Model Registry UI" announcement (its close button). Never the launchpad.
DAGSTER_POPUPS = ("//button[normalize-space()='Skip']",)
MLFLOW_POPUPS = ("//button[@aria-label='Close' and contains(@class, 'modal-close')]",)


def _dismiss_popups(driver, popups: tuple[str, ...]) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    for xpath in popups:
        for button in driver.find_elements(By.XPATH, xpath):
            try:
                if button.is_displayed():
                    button.click()
            except WebDriverException:
                pass  # it went away by itself


def click(
    driver, xpath: str, popups: tuple[str, ...], timeout_s: float = 60.0, screenshot: str = "click_failed"
):
    """Click the first visible, enabled element matching ``xpath``, retrying while the page
    re-renders (stale elements) or a dialog covers it; fail with a screenshot."""
    from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _dismiss_popups(driver, popups)
        try:
            for element in driver.find_elements(By.XPATH, xpath):
                if element.is_displayed() and element.is_enabled():
                    element.click()
                    return element
        except (ElementClickInterceptedException, StaleElementReferenceException):
            pass
        time.sleep(0.3)
    shot = save_screenshot(driver, screenshot)
    pytest.fail(f"no clickable element {xpath} within {timeout_s:.0f} s on {driver.current_url} (see {shot})")


def wait_for_text(
    driver, texts: tuple[str, ...], popups: tuple[str, ...], timeout_s: float, screenshot: str
) -> str:
    """Wait until the page's visible text holds every one of ``texts``; return that text."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        _dismiss_popups(driver, popups)
        try:
            body = driver.find_element(By.TAG_NAME, "body").text
        except StaleElementReferenceException:
            continue
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    shot = save_screenshot(driver, screenshot)
    missing = [t for t in texts if t not in body]
    pytest.fail(f"{missing} not shown on {driver.current_url} within {timeout_s:.0f} s (see {shot})")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    require_chromium()
    browser = chromium_driver(tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.quit()


# ---------------------------------------------------------------- Dagster


@pytest.fixture
def dagster_ui(tmp_path: Path):
    """``make ui``'s command on a free port, instance and data under tmp_path; killed as a group."""
    require_chromium()
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    project_home = tmp_path / "project"  # DataLayout's root: the run writes here, not in the repo
    project_home.mkdir()
    port = free_port()
    argv = [
        venv_tool("dg"),
        "dev",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--target-path",
        str(REPO_ROOT),
    ]
    env = server_env(DAGSTER_HOME=str(dagster_home), ECG_R1_HOME=str(project_home))
    with running_server(argv, tmp_path / "dagster.log", env) as server:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/server_info", server, SERVER_START_S)
        yield url, project_home, server


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.load(response)
    assert "errors" not in payload, payload
    return payload["data"]


GROUPS_QUERY = "{ assetNodes { groupName assetKey { path } } }"
RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status assetSelection { path } }
  }
}
"""


def wait_for_run(url: str, run_id: str, server, timeout_s: float = RUN_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    run: dict = {}
    while time.monotonic() < deadline:
        run = graphql(url, RUN_QUERY, {"runId": run_id})["runOrError"]
        if run.get("status") in ("SUCCESS", "FAILURE", "CANCELED"):
            return run
        time.sleep(1)
    pytest.fail(f"run {run_id} did not finish within {timeout_s:.0f} s (last: {run}):\n{server.log_tail()}")


@pytest.mark.slow
def test_dagster_ui_shows_the_asset_graph_and_materializes_from_the_launchpad(dagster_ui, driver):
    url, project_home, server = dagster_ui

    # The global asset lineage shows every stage of the pipeline as a group; expanding the data
    # group shows its assets.
    groups = sorted({node["groupName"] for node in graphql(url, GROUPS_QUERY)["assetNodes"]})
    assert "data" in groups, groups
    driver.get(f"{url}/asset-groups")
    wait_for_text(
        driver, ("Global asset lineage", *groups), DAGSTER_POPUPS, 90, "dagster_lineage_missing_groups"
    )
    save_screenshot(driver, "dagster_lineage")
    click(
        driver,
        "//div[contains(@class,'collapsedGroupNodeBox')][.//div[normalize-space()='data']]",
        DAGSTER_POPUPS,
        screenshot="dagster_lineage_group",
    )
    wait_for_text(driver, DATA_ASSETS, DAGSTER_POPUPS, 60, "dagster_lineage_missing_assets")
    save_screenshot(driver, "dagster_lineage_data")

    # A user materializes the simulator from its asset page, with a small cohort set in the launchpad.
    driver.get(f"{url}/assets/simulated_raw")
    wait_for_text(driver, ("simulated_raw", "Materialize"), DAGSTER_POPUPS, 60, "dagster_asset_page")
    click(
        driver,
        "//button[normalize-space()='Materialize']/following::button[1]",
        DAGSTER_POPUPS,
        screenshot="dagster_menu",
    )
    click(
        driver, "//*[normalize-space()='Open launchpad']", DAGSTER_POPUPS, screenshot="dagster_launchpad_menu"
    )
    wait_for_text(driver, ("Launchpad",), DAGSTER_POPUPS, 30, "dagster_launchpad")
    # The config editor is CodeMirror: set its document as typing would (typing auto-indents YAML).
    driver.execute_script(
        "document.querySelector('.CodeMirror').CodeMirror.setValue(arguments[0])", LAUNCHPAD_CONFIG
    )
    # The editor shows the new config and the launchpad finds it valid.
    wait_for_text(
        driver, ("n: 12", "track: false", "No errors"), DAGSTER_POPUPS, 30, "dagster_launchpad_config"
    )
    save_screenshot(driver, "dagster_launchpad")
    click(
        driver,
        "//div[contains(@class,'bp5-dialog')]//button[normalize-space()='Materialize']",
        DAGSTER_POPUPS,
        screenshot="dagster_launch",
    )

    # Launching opens the run's page; the run must succeed.
    deadline = time.monotonic() + 60
    while "/runs/" not in driver.current_url and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "/runs/" in driver.current_url, f"launch did not open a run page: {driver.current_url}"
    run_id = driver.current_url.rstrip("/").split("/runs/")[1].split("?")[0]
    run = wait_for_run(url, run_id, server)
    wait_for_text(
        driver,
        ("RUN_SUCCESS" if run["status"] == "SUCCESS" else "RUN_FAILURE",),
        DAGSTER_POPUPS,
        60,
        "dagster_run",
    )
    save_screenshot(driver, "dagster_run")
    assert run["status"] == "SUCCESS", f"run {run_id} ended {run['status']}:\n{server.log_tail()}"
    assert run["assetSelection"] == [{"path": ["simulated_raw"]}]
    # It ran with the launchpad's config, into the project home the UI was started with.
    manifest = project_home / "data" / "raw" / "simulated" / "manifest.csv"
    assert manifest.is_file(), f"{manifest} not written"
    assert len(manifest.read_text().strip().splitlines()) == 1 + 12


# ---------------------------------------------------------------- MLflow


@contextlib.contextmanager
def mlflow_ui_on(db: Path, artifacts: Path, workdir: Path) -> Iterator[str]:
    """``make mlflow-ui``'s command on a store (one worker: a local UI needs no more); its URL."""
    port = free_port()
    argv = [
        venv_tool("mlflow"),
        "ui",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--default-artifact-root",
        str(artifacts),
        "--workers",
        "1",
    ]
    with running_server(argv, workdir / "mlflow.log", server_env(), cwd=workdir) as server:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health", server, SERVER_START_S)
        yield url


@pytest.fixture
def mlflow_ui(tmp_path: Path):
    """The MLflow UI on an empty store in tmp_path."""
    require_chromium()
    with mlflow_ui_on(tmp_path / "mlflow.db", tmp_path / "artifacts", tmp_path) as url:
        yield url


def register_versions(url: str) -> dict[str, str]:
    """Register one version of each model through the server, as training does; return their run ids."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    experiment_id = client.create_experiment("ecg-r1-tiny")
    run_ids = {}
    for i, name in enumerate(MODEL_NAMES):
        run = client.create_run(experiment_id, run_name=name.removeprefix("ecg-r1-"))
        client.log_metric(run.info.run_id, "test_external_accuracy", 0.70 + 0.05 * i)
        client.set_terminated(run.info.run_id)
        client.create_registered_model(name)
        version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        client.set_registered_model_alias(name, "champion", version.version)
        run_ids[name] = run.info.run_id
    return run_ids


@pytest.mark.slow
def test_mlflow_ui_lists_the_registered_models(mlflow_ui, driver):
    register_versions(mlflow_ui)
    driver.get(f"{mlflow_ui}/#/models")
    wait_for_text(driver, MODEL_NAMES, MLFLOW_POPUPS, 90, "mlflow_models_missing")
    save_screenshot(driver, "mlflow_models")

    # The model's page shows its version and the champion alias.
    click(driver, "//a[normalize-space()='ecg-r1-grpo']", MLFLOW_POPUPS, screenshot="mlflow_model_link")
    wait_for_text(driver, ("Version 1", "champion"), MLFLOW_POPUPS, 60, "mlflow_model_page")
    save_screenshot(driver, "mlflow_model_grpo")


@pytest.fixture
def compared_store(tmp_path: Path, seed_mlflow_db, monkeypatch):
    """A small pipeline's store (tests/mlflow_store.py): two versions compared and logged."""
    from mlflow_store import build_logged_store

    import mlflow

    require_chromium()
    previous = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored after the test
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield build_logged_store(tmp_path / "project", seed_mlflow_db)
    mlflow.set_tracking_uri(previous)


@pytest.mark.slow
def test_mlflow_model_view_compares_the_versions_and_a_version_shows_its_card(compared_store, driver):
    """The experiment's model view lists both models with their cross-hospital accuracy (a metric
    of each LoggedModel on the test_external dataset); a version's page shows its model card."""
    from mlflow import MlflowClient

    store = compared_store
    experiment_id = MlflowClient().get_experiment_by_name(store.experiment).experiment_id
    accuracy = {
        name: store.comparison.results[row]["test_external"].accuracy.value
        for row, name in (("GRPO", "ecg-r1-grpo"), ("SFT", "ecg-r1-sft"))
    }
    assert accuracy["ecg-r1-grpo"] != accuracy["ecg-r1-sft"]  # the view must tell them apart
    root = store.root / "mlflow"
    driver.set_window_size(2400, 1200)  # room for the metric columns beside the model attributes
    with mlflow_ui_on(root / "mlflow.db", root / "artifacts", store.root) as url:
        driver.get(f"{url}/#/experiments/{experiment_id}/models?workflowType=machine_learning")
        body = wait_for_text(
            driver,
            ("ecg-r1-grpo", "ecg-r1-sft", "test_external/accuracy"),
            MLFLOW_POPUPS,
            90,
            "mlflow_model_view",
        )
        save_screenshot(driver, "mlflow_model_view")
        # Each row: ... registered model, version, dataset, then the metric columns; the next row
        # starts at its "Logged from" cell (an em dash).
        for name, value in accuracy.items():
            row = body.split(f"\n{name}\nv1\n", 1)[1].split("\n—\n", 1)[0]
            shown = [float(x) for x in re.findall(r"(?<![#\w.])\d+(?:\.\d+)?(?![\w)])", row)]
            assert any(abs(x - value) < 5e-3 for x in shown), (name, value, row)

        driver.get(f"{url}/#/models/ecg-r1-grpo/versions/1")
        external = store.comparison.results["GRPO"]["test_external"]
        wait_for_text(
            driver,
            (
                "Model card: ecg-r1-grpo version 1 (GRPO)",
                "Research use only, not for clinical decisions.",
                f"cross-hospital {external.n} {external.accuracy}",
                "Limitations",
            ),
            MLFLOW_POPUPS,
            60,
            "mlflow_version_card",
        )
        save_screenshot(driver, "mlflow_version_card")
