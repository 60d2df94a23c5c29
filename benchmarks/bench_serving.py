"""Load test of the served model: concurrent clients on 127.0.0.1, good and bad rows mixed.

Usage:
    .venv/bin/python benchmarks/bench_serving.py [--clients 8] [--requests 25] [--model URI --mlflow-root DIR]

Without ``--model`` it builds the tiny profile's (untrained) model, registers it in a temporary
MLflow store and serves it with ``ecg-r1 serve`` on a free port of 127.0.0.1; with one, it serves
that registered version of that store.

Each request is one of a few templates of one to three rows (good pages, bad rows of each kind,
a request with too large a ``max_new_tokens``), every row with an id of its own. Each template
is first answered alone, one request at a time; then ``--clients`` threads send ``--requests``
requests each at once. Every answer must have its rows' ids in order, the template's answers to
its good rows exactly (the same greedy generation on the same batch), and its bad rows refused
with the expected field; the server must still answer ``/ping``. Prints the figures (latency
p50/p95 of all requests, from send to parsed answer) and a JSON line.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import platform
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from browser import free_port, running_server, wait_for_http  # noqa: E402

from ecg_r1.imaging.draw import render_page  # noqa: E402
from ecg_r1.modeling.profiles import load_profile  # noqa: E402
from ecg_r1.tracking.serving import encode_image  # noqa: E402

EPS = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n").decode()


@functools.cache
def page_texts(n: int) -> list[str]:
    """``n`` distinct rendered pages (the tiny profile's size) as base64 PNG text."""
    config = load_profile("tiny").render_config()
    signals = [np.random.default_rng(seed).normal(0, 0.3, (12, 5000)).astype(np.float32) for seed in range(n)]
    return [encode_image(render_page(signal, config)) for signal in signals]


def templates() -> list[tuple[list[tuple[dict[str, Any], str | None]], dict[str, Any]]]:
    """The requests of the load test: ``(rows, params)``, each row with the field it must be
    refused for (None: a good row, answered by the model)."""
    pages = page_texts(6)

    def good(i: int) -> tuple[dict[str, Any], str | None]:
        return {
            "image": pages[i],
            "note": f"Chest pain, troponin {i}.",
            "age": 50.0 + i,
            "sex": "MF"[i % 2],
        }, None

    return [
        ([good(0)], {}),
        ([good(1), ({"image": pages[1], "age": float("inf")}, "age")], {}),
        ([({"image": EPS}, "image"), good(2), good(3)], {}),
        ([({"image": pages[4], "note": "x" * 5_000}, "note"), good(4)], {}),
        ([({"image": pages[0], "sex": "X"}, "sex"), ({"image": "not base64"}, "image")], {}),
        (
            [({"image": pages[5]}, "max_new_tokens"), ({"image": pages[0]}, "max_new_tokens")],
            {"max_new_tokens": 10**6},
        ),
        ([good(5), good(0)], {}),
    ]


def _post(url: str, body: dict[str, Any], timeout: float = 300) -> tuple[int, dict[str, Any] | None, float]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            status, text = reply.status, reply.read()
    except urllib.error.HTTPError as refused:
        status, text = refused.code, refused.read()
    seconds = time.perf_counter() - start
    return status, json.loads(text) if status == 200 else None, seconds


def _request(template: int, tag: str, max_new_tokens: int | None) -> dict[str, Any]:
    rows, params = templates()[template]
    params = {"max_new_tokens": max_new_tokens, **params} if max_new_tokens else params
    return {
        "dataframe_records": [{**row, "id": f"{tag}-{j}"} for j, (row, _) in enumerate(rows)],
        "params": params,
    }


def _check(template: int, body: dict[str, Any], answer: dict[str, Any] | None, expected: list[dict]) -> bool:
    """The answer has the request's ids in order, the serial answer to each good row and each
    bad row refused for its field."""
    rows, _ = templates()[template]
    if answer is None or len(answer["predictions"]) != len(rows):
        return False
    answers = zip(rows, body["dataframe_records"], answer["predictions"], expected, strict=True)
    for (_, field), sent, got, want in answers:
        if got["id"] != sent["id"]:
            return False
        if field is None and {**got, "id": None} != {**want, "id": None}:
            return False
        if field is not None and not (got["valid"] is False and got["problem"].startswith(f"{field}:")):
            return False
    return True


def load_test(url: str, clients: int = 8, requests_each: int = 25, max_new_tokens: int | None = None) -> dict:
    """Send ``clients`` x ``requests_each`` requests at once and check every answer.

    Returns:
        Figures: ``requests``, ``rows``, ``errors`` (no 200 answer), ``mismatches`` (an answer
        not matching its request), ``server_up``, latency ``p50_s``/``p95_s``/``max_s``, ``wall_s``.
    """
    expected = []
    for template in range(len(templates())):
        status, answer, _ = _post(url, _request(template, "serial", max_new_tokens))
        if status != 200 or answer is None:
            raise RuntimeError(f"template {template} was not answered alone (HTTP {status})")
        expected.append(answer["predictions"])

    def client(c: int) -> list[tuple[int, float, bool]]:
        results = []
        for k in range(requests_each):
            template = (c + k) % len(templates())
            body = _request(template, f"c{c}-r{k}", max_new_tokens)
            status, answer, seconds = _post(url, body)
            results.append((status, seconds, _check(template, body, answer, expected[template])))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [result for part in pool.map(client, range(clients)) for result in part]
    wall = time.perf_counter() - start
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as reply:
            server_up = reply.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        server_up = False
    latencies = np.array([seconds for _, seconds, _ in results])
    return {
        "clients": clients,
        "requests": len(results),
        "rows": sum(
            len(templates()[(c + k) % len(templates())][0])
            for c in range(clients)
            for k in range(requests_each)
        ),
        "errors": sum(status != 200 for status, _, _ in results),
        "mismatches": sum(status == 200 and not ok for status, _, ok in results),
        "server_up": server_up,
        "p50_s": round(float(np.percentile(latencies, 50)), 3),
        "p95_s": round(float(np.percentile(latencies, 95)), 3),
        "max_s": round(float(latencies.max()), 3),
        "wall_s": round(wall, 2),
    }


def _tiny_store(root: Path) -> str:
    """Build the tiny profile's model, register it as ``ecg-r1-grpo@champion`` in a store at
    ``root``; its model URI."""
    from ecg_r1.modeling.build import build_base_model, corpus_from_cases
    from ecg_r1.tracking import model_registry
    from ecg_r1.tracking import runs as tracking

    cases = [{"age": 50 + i, "sex": "F", "note": f"Troponin {i}.", "twi_leads": "V2,V3"} for i in range(20)]
    folder = build_base_model(load_profile("tiny"), corpus_from_cases(cases), root / "model")
    tracking.configure(root)
    with tracking.start_or_resume_run("tiny", "grpo") as run:
        version = model_registry.register_model_version(run.info.run_id, folder, "ecg-r1-grpo")
    model_registry.set_alias("ecg-r1-grpo", "champion", version)
    return "models:/ecg-r1-grpo@champion"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument(
        "--model", help="a registered version (default: the tiny profile's model, built here)"
    )
    parser.add_argument(
        "--mlflow-root", type=Path, default=ROOT, help="the store's project root, with --model"
    )
    parser.add_argument("--max-new-tokens", type=int, help="default: the model's profile cap")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = args.mlflow_root
        model = args.model
        if model is None:
            root = Path(tmp)
            model = _tiny_store(root)
        port = free_port()
        command = [sys.executable, "-m", "ecg_r1.cli", "serve", "--model", model, "--port", str(port)]
        command += ["--mlflow-root", str(root)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        with running_server(command, Path(tmp) / "server.log", env) as server:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/ping", server, timeout_s=120)
            figures = load_test(url, args.clients, args.requests, args.max_new_tokens)
    figures.update(
        model=model, machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    )
    print(
        f"{figures['requests']} requests ({figures['rows']} rows) from {figures['clients']} clients in "
        f"{figures['wall_s']} s: latency p50 {figures['p50_s']} s, p95 {figures['p95_s']} s, "
        f"max {figures['max_s']} s; {figures['errors']} errors, {figures['mismatches']} mismatched, "
        f"server up: {figures['server_up']}"
    )
    print(json.dumps(figures))
    return 0 if figures["errors"] == figures["mismatches"] == 0 and figures["server_up"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
