"""Helpers for the browser tests: a free loopback port, a server in its own process group,
waiting for HTTP, and a headless Chromium driven by Selenium.

Servers such as ``dagster dev`` and ``mlflow ui`` spawn children and, started from a script,
ignore SIGINT/SIGTERM sent to the parent alone (../shared/STACK.md): each server is started
in a new session (its own process group) and the whole group is killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from ecg_r1.constants import REPO_ROOT

ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Without the background-networking flags Chromium opens connections of its own (updates,
# sync, field trials) that this closed network refuses, which stalls page loads.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_chromium() -> None:
    """Skip the calling test with the reason when Chromium, chromedriver or Selenium is missing."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not (Path(binary).is_file() and os.access(binary, os.X_OK)):
            pytest.skip(
                f"{binary} not found: install Debian's chromium and chromium-driver "
                "(`apt-get install chromium chromium-driver`, as .ci/run does)"
            )
    pytest.importorskip("selenium", reason="selenium is not installed: `pip install -e '.[dev]'`")


class Server:
    """A server process started in its own process group, with its output in a log file."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,  # own process group: stop() kills the whole tree
        )

    def log_tail(self, n_chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n_chars:]

    def stop(self, grace_s: float = 5.0) -> None:
        """Kill the server's process group: TERM, then KILL after ``grace_s``."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=grace_s)
        # Children may outlive the leader; the group id stays the leader's pid.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@contextlib.contextmanager
def running_server(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path = REPO_ROOT
) -> Iterator[Server]:
    """Start ``argv`` in its own process group and kill the group on exit, whatever happens."""
    server = Server(argv, log_path, env if env is not None else os.environ, cwd)
    try:
        yield server
    finally:
        server.stop()


def wait_for_http(url: str, server: Server, timeout_s: float = 60.0) -> None:
    """Poll ``url`` until it answers HTTP 200; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(
                f"{server.argv[0]} exited with {server.proc.returncode} before answering {url}:\n"
                f"{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last_error = str(exc)
        time.sleep(0.25)
    pytest.fail(f"{url} did not answer within {timeout_s:.0f} s ({last_error}):\n{server.log_tail()}")


def server_env(**overrides: str) -> dict[str, str]:
    """The test's environment with the venv's bin first on PATH, plus ``overrides``."""
    env = dict(os.environ)
    # The interpreter running pytest is the project's: its console scripts sit beside it.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(overrides)
    return env


def venv_tool(name: str) -> str:
    """Path of a console script beside the running interpreter (or on PATH), skipping when absent."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"`{name}` not found in .venv/bin or on PATH: run `make setup`")
    return found


def chromium_driver(user_data_dir: Path):
    """A headless Chromium WebDriver with a private profile in ``user_data_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


def save_screenshot(driver, name: str) -> Path:
    """Save a PNG of the current page under ``test-artifacts/`` (gitignored) and return its path."""
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    path = ARTIFACTS_DIR / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
