"""The served model over HTTP: ``ecg-r1 serve`` (``mlflow models serve``) on 127.0.0.1 with a
small registered model, and every request limit, checked from the client's side.

One server serves the module (it starts in 10-20 s); each test posts a few requests. A bad row
must come back as ``valid: false`` with its field named, beside its batch's good rows; no answer
may carry a stack trace or the request's data.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
from browser import free_port, running_server, server_env, wait_for_http

import ecg_r1
from ecg_r1.tracking import serving

mlflow = pytest.importorskip("mlflow")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_serving import load_test, page_texts  # noqa: E402

MAX_NEW_TOKENS = 8
# A note's text a served row repeats nowhere: it must not come back in any answer.
SECRET = "Chest pain since 0300 (note-7f3a)"


def png_header(width: int, height: int) -> str:
    """A PNG claiming ``width`` x ``height`` pixels in a few dozen bytes (its pixel data is one
    row): what a decompression bomb looks like before it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return base64.b64encode(data + chunk(b"IEND", b"")).decode()


@pytest.fixture(scope="module")
def server_url(store, small_model_dir, tmp_path_factory) -> str:
    """``ecg-r1 serve --model models:/ecg-r1-grpo@champion`` on a free port of 127.0.0.1."""
    from ecg_r1.tracking import model_registry
    from ecg_r1.tracking import runs as tracking

    root, _ = store
    with tracking.start_or_resume_run("tiny", "grpo") as run:
        version = model_registry.register_model_version(run.info.run_id, small_model_dir, "ecg-r1-grpo")
    model_registry.set_alias("ecg-r1-grpo", "champion", version)
    port = free_port()
    command = [sys.executable, "-m", "ecg_r1.cli", "serve", "--model", "models:/ecg-r1-grpo@champion"]
    command += ["--port", str(port), "--mlflow-root", str(root)]
    # the served code imports this checkout's ecg_r1
    env = server_env(PYTHONPATH=str(Path(ecg_r1.__file__).parents[1]))
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(command, log, env) as server:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/ping", server, timeout_s=180)  # a busy machine is slow to start it
        yield url
        assert server.proc.poll() is None, f"the server died: {server.log_tail()}"


def post(url: str, body: dict | bytes, timeout: float = 60) -> tuple[int, str]:
    """POST a request to ``/invocations``: its status and body text."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def answer(url: str, rows: list[dict], **params) -> list[dict]:
    """The answers to ``rows``: status 200, strict JSON (no NaN), one answer per row, none of
    them repeating a row's note."""
    status, text = post(
        url, {"dataframe_records": rows, "params": {"max_new_tokens": MAX_NEW_TOKENS, **params}}
    )
    assert status == 200, text[:2000]
    assert SECRET not in text and "Traceback" not in text
    predictions = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the answer"))[
        "predictions"
    ]
    assert len(predictions) == len(rows)
    for prediction in predictions:
        assert set(prediction) == set(serving.OUTPUT_COLUMNS)
    return predictions


def good(i: int = 0, **change) -> dict:
    return {
        "id": f"case-{i}",
        "image": page_texts(6)[i],
        "note": SECRET,
        "age": 60.0 + i,
        "sex": "F",
        **change,
    }


def assert_answered(prediction: dict) -> None:
    """A row the model answered (an untrained model breaks the format: its problem says so)."""
    assert isinstance(prediction["completion"], str) and 0.0 <= prediction["p_yes"] <= 1.0


def assert_refused(prediction: dict, field: str) -> None:
    """A row refused before the model saw it, for ``field``."""
    assert prediction["valid"] is False and prediction["completion"] is None and prediction["p_yes"] is None
    assert prediction["problem"].startswith(f"{field}:"), prediction["problem"]


@pytest.mark.slow
class TestLimitsOverHTTP:
    def test_a_bad_row_is_answered_beside_good_ones(self, server_url):
        """Every kind of bad row in one batch, between good rows: each good row is answered as it
        is alone, each bad one names its field, and ids come back with their rows."""
        eps = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n").decode()
        bad = [
            ({"image": "not base64!"}, "image"),
            ({"image": eps}, "image"),  # PostScript never reaches PIL (nor Ghostscript)
            ({"image": base64.b64encode(b"GIF89a" + b"\0" * 32).decode()}, "image"),
            ({"image": png_header(40_000, 40_000)}, "image"),  # past PIL's own bomb error
            ({"image": png_header(12_000, 12_000)}, "image"),  # past PIL's bomb warning
            ({"image": png_header(5_001, 5_000)}, "image"),  # just above 25 MP
            ({"image": page_texts(6)[0][:200]}, "image"),  # a truncated PNG
            ({"age": float("inf")}, "age"),
            ({"age": -5}, "age"),
            ({"age": 400}, "age"),
            ({"age": "old"}, "age"),
            ({"sex": "X"}, "sex"),
            ({"note": "x" * 8_000_000}, "note"),
            ({"note": 7}, "note"),
            ({"image": None}, "image"),
        ]
        alone = answer(server_url, [good(0), good(2)])
        for prediction in alone:
            assert_answered(prediction)
        problems = []
        for part in (bad[:8], bad[8:]):  # two requests: MAX_ROWS is 16
            rows = [
                good(0),
                *(good(1, id=f"bad-{n}", **change) for n, (change, _) in enumerate(part)),
                good(2),
            ]
            predictions = answer(server_url, rows)
            assert [p["id"] for p in predictions] == [row["id"] for row in rows]
            assert [predictions[0], predictions[-1]] == alone
            for prediction, (_, field) in zip(predictions[1:-1], part, strict=True):
                assert_refused(prediction, field)
                problems.append(prediction["problem"])
        assert "5001 x 5000 px" in problems[5]

    def test_png_and_jpeg_pages_are_answered(self, server_url):
        from PIL import Image

        png = base64.b64decode(page_texts(6)[0])
        jpeg = serving.encode_image(Image.open(io.BytesIO(png)), format="JPEG")
        [from_png, from_jpeg] = answer(server_url, [good(0), good(0, image=jpeg)])
        assert_answered(from_png) and assert_answered(from_jpeg)

    @pytest.mark.parametrize("value", [10**6, 0, -3, 5.5])
    def test_max_new_tokens_beyond_the_profile_cap_is_refused(self, server_url, value):
        predictions = answer(server_url, [good(0), good(1)], max_new_tokens=value)
        for prediction in predictions:
            assert_refused(prediction, "max_new_tokens")
        assert "from 1 to 16" in predictions[0]["problem"]  # the tiny profile's cap

    def test_too_many_rows_refuse_the_request(self, server_url):
        rows = [good(0, id=str(i)) for i in range(serving.MAX_ROWS + 1)]
        predictions = answer(server_url, rows)
        assert [p["id"] for p in predictions] == [str(i) for i in range(serving.MAX_ROWS + 1)]
        for prediction in predictions:
            assert_refused(prediction, "request")
        assert f"{serving.MAX_ROWS + 1} rows, at most {serving.MAX_ROWS}" in predictions[0]["problem"]

    def test_too_much_text_refuses_the_request(self, server_url):
        """Rows within every per-field limit, more than MAX_REQUEST_CHARS in all, in a body under
        MAX_BODY_BYTES (a larger one is refused before it is read)."""
        image = "A" * (serving.MAX_REQUEST_CHARS // 7 + 8)  # base64 text under the image limit
        rows = [good(0, id=str(i), image=image) for i in range(7)]
        assert 7 * len(image) > serving.MAX_REQUEST_CHARS and 7 * len(image) < serving.MAX_BODY_BYTES - 2**20
        for prediction in answer(server_url, rows):
            assert_refused(prediction, "request")

    def test_the_load_test_loses_and_mixes_nothing(self, server_url):
        """The benchmark's load test, small: 4 clients x 5 requests, good and bad rows mixed."""
        figures = load_test(server_url, clients=4, requests_each=5, max_new_tokens=MAX_NEW_TOKENS)
        assert figures["requests"] == 20 and figures["mismatches"] == 0 and figures["errors"] == 0
        assert figures["server_up"]

    def test_a_request_without_images_names_the_field(self, server_url):
        predictions = answer(server_url, [{"note": "x", "id": "a"}, {"age": 50, "id": "b"}])
        for prediction in predictions:
            assert_refused(prediction, "image")


def assert_short_error(status: int, text: str, expected_status: int, says: str) -> None:
    """A refusal by the server: ``expected_status``, a short JSON naming what was wrong, and no
    request data (the note's text) nor stack trace."""
    assert status == expected_status, text[:2000]
    error = json.loads(text)
    assert set(error) == {"error_code", "message"} and says in error["message"], error
    assert len(text) < 300 and SECRET not in text and "Traceback" not in text and "File " not in text


def raw_post(url: str, headers: dict[str, str], parts: list[bytes]) -> tuple[int, str] | None:
    """POST ``parts`` to ``/invocations`` with ``headers`` as they are (chunked when they say so):
    the status and body, or None when the server closed the connection before the client could
    send everything (it refused the body without reading it whole)."""
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.putrequest("POST", "/invocations")
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        chunked = headers.get("Transfer-Encoding") == "chunked"
        for part in parts:
            connection.send(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
        if chunked:
            connection.send(b"0\r\n\r\n")
        reply = connection.getresponse()
        return reply.status, reply.read().decode()
    except (BrokenPipeError, ConnectionResetError):
        return None
    finally:
        connection.close()


@pytest.mark.slow
class TestRefusalsOverHTTP:
    """Requests MLflow's scoring app would read without bound or answer with the request echoed:
    ``ecg-r1 serve`` answers them with a short JSON error."""

    def test_a_body_over_the_limit_is_refused_from_its_length(self, server_url):
        """413 at once: the client sends the headers and no byte of the body."""
        headers = {"Content-Type": "application/json", "Content-Length": str(serving.MAX_BODY_BYTES + 1)}
        status, text = raw_post(server_url, headers, [])
        assert_short_error(status, text, 413, "more than 72 MiB")

    def test_a_chunked_body_over_the_limit_is_cut(self, server_url):
        headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        part = b'{"dataframe_records": [{"note": "' + SECRET.encode() + b" " * 2**20
        replied = raw_post(server_url, headers, [part] * (serving.MAX_BODY_BYTES // len(part) + 2))
        if replied is not None:  # else the server closed the connection mid-body: refused too
            assert_short_error(*replied, 413, "more than 72 MiB")
        assert answer(server_url, [good(0)])  # still up, and answering

    def test_a_chunked_body_within_the_limit_is_answered(self, server_url):
        body = json.dumps({"dataframe_records": [good(0)], "params": {"max_new_tokens": MAX_NEW_TOKENS}})
        headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        status, text = raw_post(server_url, headers, [body[:1000].encode(), body[1000:].encode()])
        assert status == 200 and json.loads(text)["predictions"] == answer(server_url, [good(0)])

    @pytest.mark.parametrize(
        ("body", "says"),
        [
            (b'{"dataframe_records": [{"note": "' + SECRET.encode() + b'"', "not valid JSON"),
            (b"\xff\xfe" + SECRET.encode(), "not valid JSON"),
            (json.dumps([{"note": SECRET}]).encode(), "must be a JSON object"),
            (json.dumps({"records": [{"note": SECRET}]}).encode(), "must be a JSON object"),
            (json.dumps({"dataframe_records": [{"note": SECRET}], "params": [1]}).encode(), "params must be"),
            (json.dumps({"dataframe_records": [{"note": SECRET}], "params": "x"}).encode(), "params must be"),
        ],
    )
    def test_a_malformed_request_is_refused_without_echo(self, server_url, body, says):
        assert_short_error(*post(server_url, body), 400, says)

    @pytest.mark.parametrize("value", ["many", [8], True, {"n": 8}])
    def test_a_max_new_tokens_that_is_not_a_number_is_refused(self, server_url, value):
        body = {"dataframe_records": [good(0)], "params": {"max_new_tokens": value}}
        assert_short_error(*post(server_url, body), 400, "max_new_tokens must be a number")

    def test_other_errors_are_short_too(self, server_url):
        request = urllib.request.Request(f"{server_url}/invocations", data=b"a,b\n1,2", method="POST")
        request.add_header("Content-Type", "text/plain")
        try:
            urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as refused:
            assert_short_error(refused.code, refused.read().decode(), 415, "application/json")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{server_url}/nowhere", timeout=60)
        assert_short_error(missing.value.code, missing.value.read().decode(), 404, "no such endpoint")

    @pytest.mark.parametrize("path", ["/ping", "/health"])
    def test_ping_and_health_answer(self, server_url, path):
        with urllib.request.urlopen(f"{server_url}{path}", timeout=60) as reply:
            assert reply.status == 200
