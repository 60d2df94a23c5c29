"""``ecg-r1 serve --model models:/ecg-r1-grpo@champion``: the registered model behind an HTTP endpoint
on 127.0.0.1, by MLflow's scoring app behind a body limit and short errors (``serving_app``), once the
version is found in the project's own store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ecg_r1.cli.predict import add_mlflow_root

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a registered model over HTTP (MLflow's scoring app) on 127.0.0.1",
        description="Check that a registered version lies in the project's own MLflow store, then serve "
        "it with MLflow's scoring app under uvicorn (one worker), with a request body limit and short "
        "JSON errors. POST /invocations takes {'dataframe_records': [{'image': <base64 PNG or JPEG>, "
        "'note', 'age', 'sex', 'id'}]} and answers reasoning, answer and P(Yes) per row; a row beyond "
        "a limit is answered valid: false with the field named (docs/serving.md).",
    )
    parser.add_argument("--model", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    add_mlflow_root(parser)
    parser.set_defaults(func=run)


def served_version(model: str, mlflow_root: Path) -> str:
    """The ``models:/NAME/VERSION`` URI to serve for ``model``, with MLflow pointed at the store.

    The alias is resolved here, so the server serves the version checked even if the alias
    moves while it starts.

    Raises:
        ValueError: for a malformed URI, no store, an unknown version, or one stored elsewhere.
    """
    from ecg_r1.tracking import model_registry
    from ecg_r1.tracking import runs as tracking

    model_registry.parse_model_uri(model)  # a malformed URI is refused before any store is touched
    tracking.open_store(mlflow_root)
    name, version = model_registry.resolve_version(model)
    model_registry.check_in_store(name, version)
    return f"models:/{name}/{version}"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ecg_r1.tracking.serving_app import scoring_app

    try:
        uri = served_version(args.model, args.mlflow_root)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    if args.host not in LOOPBACK:
        # The body and every field are bounded, but nothing authenticates or encrypts (docs/serving.md).
        print(
            f"warning: {args.host} is reachable from other machines, and the server has no "
            "authentication nor TLS: put a proxy that has them in front of it",
            file=sys.stderr,
            flush=True,
        )
    app = scoring_app(uri)
    print(f"serving {args.model} ({uri}) on http://{args.host}:{args.port}/invocations", flush=True)
    # One worker: the model answers one request at a time (its tokenizer's state is shared).
    uvicorn.run(app, host=args.host, port=args.port, workers=1)
    return 0
