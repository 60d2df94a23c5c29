"""The HTTP app ``ecg-r1 serve`` runs: MLflow's own scoring app (``mlflow.pyfunc.scoring_server.init``)
behind :class:`RequestGuard`, which bounds the request body and answers every error with a short
JSON of its own.

MLflow's app reads a body whole with no bound, and its refusals (a body that is not JSON, ``params``
that is not an object...) echo the request data back, with a stack trace for other exceptions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from ecg_r1.tracking.serving import MAX_BODY_BYTES

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

_logger = logging.getLogger(__name__)

# What MLflow's message says (a fixed part of it, never the request's) -> what the client is told.
_MLFLOW_REFUSALS = (
    ("Ensure that input is a valid JSON", "request body is not valid JSON (UTF-8)"),
    ("Ensure that input is a valid UTF-8", "request body is not valid UTF-8"),
    (
        "The input must be a JSON dictionary",
        "request body must be a JSON object with one of the fields dataframe_records, "
        "dataframe_split, instances, inputs",
    ),
    ("Parameters must be a dictionary", "params must be an object"),
    ("Invalid parameters found", "params.max_new_tokens must be a number"),
    ("Failed to enforce schema", "a row's fields do not match the model's input columns"),
)
_BY_STATUS = {
    404: "no such endpoint: POST /invocations, GET /ping, /health or /version",
    405: "method not allowed: POST /invocations, GET /ping, /health or /version",
    413: f"request body is more than {MAX_BODY_BYTES // 2**20} MiB",
    415: "content type must be application/json (UTF-8)",
    504: "request took longer than the server's time limit",
}


class BodyTooLarge(Exception):
    """The request body ran past the limit while it was read."""


def error_body(status: int, original: bytes) -> bytes:
    """The short JSON answered for an error response of MLflow's app with ``status`` and body
    ``original``: an ``error_code`` and a ``message`` in general terms, never ``original``'s text
    (which may repeat the request, or carry a stack trace)."""
    try:
        sent = json.loads(original)
    except ValueError:
        sent = None
    mlflow_message = sent.get("message") if isinstance(sent, dict) else None
    error_code = sent.get("error_code") if isinstance(sent, dict) else None
    message = _BY_STATUS.get(status)
    if isinstance(mlflow_message, str):
        message = next((told for said, told in _MLFLOW_REFUSALS if said in mlflow_message), message)
    if message is None:
        message = "the model could not answer this request" if status < 500 else "internal server error"
    if not isinstance(error_code, str) or not error_code.isidentifier():
        error_code = HTTPStatus(status).name if status in HTTPStatus._value2member_map_ else "ERROR"
    # The status and codes only: MLflow's message carries the request's data.
    _logger.debug("answered %d %s (%s) for a %d-byte error body", status, error_code, message, len(original))
    return json.dumps({"error_code": error_code, "message": message}).encode()


class RequestGuard:
    """ASGI middleware: refuses a request body over ``max_body_bytes`` with 413 (at once from its
    Content-Length, or when a chunked body runs past it), and replaces the body of every response
    with status >= 400 by :func:`error_body`.

    The body is read whole here and handed on in one piece, as MLflow's app reads it whole anyway.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        # uvicorn refuses a Content-Length that is not a number before the app is called.
        if length is not None and int(length) > self.max_body_bytes:
            await _answer(send, 413, b"")
            return
        try:
            body = await self._read_body(receive)
        except BodyTooLarge:
            await _answer(send, 413, b"")
            return
        await self.app(scope, _replay(body, receive), _ErrorRewriter(send))

    async def _read_body(self, receive: Receive) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the app sees no body
                return b""
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body_bytes:
                raise BodyTooLarge
            if not message.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands ``body`` over once, then waits on the client (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class _ErrorRewriter:
    """A ``send`` that holds an error response until its body is complete, then sends
    :func:`error_body` of it instead; other responses pass as they come."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status: int | None = None
        self.parts: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.status = message["status"]
        elif self.status is None:
            await self.send(message)
        elif message["type"] == "http.response.body":
            self.parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                await _answer(self.send, self.status, b"".join(self.parts))


async def _answer(send: Send, status: int, original: bytes) -> None:
    body = error_body(status, original)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def scoring_app(model_uri: str) -> ASGIApp:
    """MLflow's scoring app for the pyfunc at ``model_uri``, loaded now, behind :class:`RequestGuard`."""
    from mlflow.pyfunc import scoring_server

    return RequestGuard(scoring_server.init(scoring_server.load_model_with_mlflow_config(model_uri)))
