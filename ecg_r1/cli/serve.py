"""``ecg-r1 serve --model models:/ecg-r1-grpo@champion``: the registered model behind an HTTP endpoint
on 127.0.0.1, by ``mlflow models serve``, once the version is found in the project's own store."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ecg_r1.cli.predict import add_mlflow_root

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a registered model over HTTP (mlflow models serve) on 127.0.0.1",
        description="Check that a registered version lies in the project's own MLflow store, then run "
        "`mlflow models serve` on it in this environment (--env-manager local). POST /invocations "
        "takes {'dataframe_records': [{'image': <base64 PNG or JPEG>, 'note', 'age', 'sex', 'id'}]} "
        "and answers reasoning, answer and P(Yes) per row; a row beyond a limit is answered "
        "valid: false with the field named (docs/serving.md).",
    )
    parser.add_argument("--model", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    add_mlflow_root(parser)
    parser.set_defaults(func=run)


def serve_command(model: str, mlflow_root: Path, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow models serve`` command line and environment for a registered version.

    The alias is resolved here, so the server serves the version checked even if the alias
    moves while it starts.

    Raises:
        ValueError: for a malformed URI, no store, an unknown version, or one stored elsewhere.
    """
    from ecg_r1.tracking import model_registry
    from ecg_r1.tracking import runs as tracking

    model_registry.parse_model_uri(model)  # a malformed URI is refused before any store is touched
    uri = tracking.open_store(mlflow_root)
    name, version = model_registry.resolve_version(model)
    model_registry.check_in_store(name, version)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/{version}"]
    command += ["--env-manager", "local", "-h", host, "-p", str(port)]
    return command, {**os.environ, **server_environment(uri)}


def server_environment(uri: str) -> dict[str, str]:
    """What ``mlflow models serve`` needs in its environment beyond this process's: the store, and
    this interpreter's ``bin`` first on ``PATH``, since it starts the server as ``uvicorn`` from
    ``PATH`` (``.venv/bin/python`` run without activating the virtualenv has it elsewhere)."""
    path = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": path}


def run(args: argparse.Namespace) -> int:
    try:
        command, env = serve_command(args.model, args.mlflow_root, args.host, args.port)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    print(f"serving {args.model} on http://{args.host}:{args.port}/invocations", flush=True)
    if args.host not in LOOPBACK:
        # The model bounds what it decodes and runs, not what the server reads (docs/serving.md).
        print(
            f"warning: {args.host} is reachable from other machines, and MLflow's scoring server reads "
            "any request body whole: put a proxy with a body limit in front of it",
            file=sys.stderr,
            flush=True,
        )
    os.execvpe(command[0], command, env)  # the server replaces this process: signals reach it
    return 0
