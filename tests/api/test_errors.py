"""Every error case answers with its status and OpenAI's error shape; auth; 429."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from openai import AuthenticationError, OpenAI, RateLimitError

from ..models.gguf_files import write_gguf
from .conftest import load_split, start_cluster, stop_cluster


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def chat(cluster, **fields):
    body = {"model": str(cluster.model), "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return cluster.post("/v1/chat/completions", {k: v for k, v in body.items() if v is not None})


def test_no_cross_origin_access_unless_asked(cluster):
    response = httpx.get(cluster.url + "/v1/models", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in response.headers


def test_malformed_json_is_a_400(cluster):
    response = httpx.post(
        cluster.url + "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert_openai_error(response, 400)
    not_an_object = httpx.post(
        cluster.url + "/v1/completions",
        content=b"[1, 2]",
        headers={"content-type": "application/json"},
    )
    assert_openai_error(not_an_object, 400)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, None),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ({"stop": ["a"] * 40}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"seed": -1}, "seed"),
        ({"max_tokens": 100_000}, None),  # beyond the context
        ({"model": None}, "model"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(cluster, fields, param):
    error = assert_openai_error(chat(cluster, **fields), 400, param)
    assert error["type"] == "invalid_request_error"


def test_content_parts_are_joined_like_plain_text(cluster):
    parts = chat(
        cluster,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        max_tokens=5,
        temperature=0,
    )
    plain = chat(cluster, max_tokens=5, temperature=0)
    assert parts.status_code == plain.status_code == 200
    assert parts.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_unknown_model_is_404_and_unknown_route_too(cluster):
    error = assert_openai_error(chat(cluster, model="no-such-model"), 404)
    assert error["code"] == "model_not_found"
    assert_openai_error(cluster.get("/v1/models/no-such-model"), 404)
    assert_openai_error(cluster.get("/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(cluster.url + "/v1/chat/completions"), 405)


def test_a_gguf_of_k_quants_is_refused_at_prepare_with_a_400(cluster, tiny_model, tmp_path):
    source = tiny_model(arch="qwen3", layers=2, hidden=256)
    raw = {"blk.0.attn_q.weight": ("Q6_K", np.zeros((256, 210), np.uint8))}  # 256 x 256
    path = write_gguf(source, tmp_path / "k.gguf", "Q8_0", raw=raw)
    error = assert_openai_error(cluster.post("/v1/prepare_topology", {"model": str(path)}), 400)
    assert error["code"] == "unsupported_tensor_type"
    assert "blk.0.attn_q.weight is Q6_K" in error["message"] and "Q8_0" in error["message"]
    # The loaded model still serves.
    assert chat(cluster, max_tokens=2).status_code == 200


def test_no_model_loaded_is_503_and_no_peers_cannot_prepare(tiny_model, tmp_path):
    c = start_cluster(tmp_path, tiny_model(arch="qwen3"), 0)
    try:
        assert c.get("/health").json()["state"] == "idle"
        assert c.get("/v1/models").json() == {"object": "list", "data": []}
        error = assert_openai_error(chat(c), 503)
        assert error["code"] == "model_not_loaded"
        assert_openai_error(c.post("/v1/prepare_topology", {"model": str(c.model)}), 503)
        bad_dtype = {"model": str(c.model), "compute_dtype": "int8"}
        assert_openai_error(c.post("/v1/prepare_topology", bad_dtype), 400, "compute_dtype")
        assert_openai_error(c.post("/v1/load_model", {}), 400, "model")
        assert_openai_error(c.get("/v1/topology"), 404)
    finally:
        stop_cluster(c)


def test_api_key_over_capacity_and_a_dead_peer(tiny_model, tmp_path):
    c = start_cluster(
        tmp_path,
        tiny_model(arch="qwen3"),
        2,
        "--api-key",
        "sesame",
        "--max-concurrent",
        "1",
        "--cors-origin",
        "http://localhost:3000",
        headers={"Authorization": "Bearer sesame"},
    )
    try:
        load_split(c)
        # Auth: /v1 needs the key, /health does not.
        assert httpx.get(c.url + "/health").status_code == 200
        no_key = httpx.get(c.url + "/v1/models")
        assert assert_openai_error(no_key, 401)["code"] == "invalid_api_key"
        wrong = OpenAI(base_url=c.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(AuthenticationError):
            wrong.models.list()
        lower = httpx.get(c.url + "/v1/models", headers={"Authorization": "bearer sesame"})
        assert lower.status_code == 200  # the scheme is case-insensitive (RFC 7235)
        right = OpenAI(base_url=c.url + "/v1", api_key="sesame", max_retries=0, timeout=30)
        assert right.models.list().data[0].id == str(c.model)
        # A browser app of the allowed origin: the preflight needs no key.
        preflight = httpx.options(
            c.url + "/v1/chat/completions",
            headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "Authorization" in preflight.headers["access-control-allow-headers"]
        assert c.get("/v1/models").headers["access-control-allow-origin"] == "http://localhost:3000"

        # Over capacity: one long stream holds the only slot.
        long = {**_long_request(c), "stream": True}
        with (
            httpx.Client(timeout=30, headers=c.headers) as http,
            http.stream("POST", c.url + "/v1/chat/completions", json=long) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            error = assert_openai_error(chat(c, max_tokens=4), 429)
            assert error["code"] == "rate_limit_exceeded"
            with pytest.raises(RateLimitError):
                right.chat.completions.create(
                    model=str(c.model), messages=[{"role": "user", "content": "x"}]
                )

            # A peer dies mid-stream: an error event, then the stream ends.
            c.peers[1].kill()
            rest = list(lines)
        events = [line[6:] for line in rest if line.startswith("data: ")]
        assert '"error"' in events[-1] and "[DONE]" not in events
        assert "ap1" in events[-1]  # the error names the dead peer
        # No reload by hand: the head re-plans on the survivor by itself.
        c.wait(lambda: chat(c, max_tokens=3).status_code == 200, 30, "service resumes")
        assert [a["name"] for a in c.get("/v1/topology").json()["assignments"]] == ["ap0"]
        assert c.get("/health").json()["state"] == "loaded"
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(lambda: c.post("/v1/chat/completions", _long_request(c)))
            c.wait(lambda: c.peer_active() == [1], 10, "the request runs")
            c.peers[0].kill()
            killed = time.monotonic()
            response = pending.result(timeout=30)
        assert time.monotonic() - killed < 5
        error = assert_openai_error(response, 503)
        assert "ap0" in error["message"]
    finally:
        stop_cluster(c)


def _long_request(c) -> dict:
    return {
        "model": str(c.model),
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 3000,
        "temperature": 0.9,
        "seed": 1,
    }


def test_web_pages_cannot_drive_the_head(cluster):
    url = cluster.url
    # "Simple" cross-site POSTs (no preflight): text/plain and a form.
    plain = httpx.post(
        url + "/v1/unload_model", content=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert assert_openai_error(plain, 415)["code"] == "unsupported_media_type"
    form = httpx.post(url + "/v1/chat/completions", data={"model": "x"})
    assert_openai_error(form, 415)
    # JSON from a page of another origin: refused before anything runs.
    evil = {"Origin": "https://evil.example"}
    for path in ("/v1/unload_model", "/v1/load_model", "/v1/chat/completions"):
        refused = httpx.post(url + path, json={}, headers=evil)
        assert assert_openai_error(refused, 403)["code"] == "origin_not_allowed"
    # DNS rebinding: the page's own name in Host, to read the answers.
    rebound = httpx.get(url + "/v1/models", headers={"Host": "evil.example"})
    assert assert_openai_error(rebound, 403)["code"] == "host_not_allowed"
    assert cluster.get("/health").json()["state"] == "loaded"  # nothing was unloaded
    # The head's own names and origin still work.
    port = urlsplit(url).port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"Origin": url}).status_code == 200


def test_deep_json_and_big_bodies_are_refused_cheaply(cluster):
    deep = b"[" * 100_000 + b"]" * 100_000
    response = httpx.post(
        cluster.url + "/v1/chat/completions",
        content=deep,
        headers={"Content-Type": "application/json"},
    )
    assert "nests deeper" in assert_openai_error(response, 400)["message"]
    nested: object = "x"
    for _ in range(70):
        nested = [nested]
    too_deep = chat(cluster, metadata=nested)
    assert "nests deeper" in assert_openai_error(too_deep, 400)["message"]
    pid = cluster.console.proc.pid
    before = _peak_rss(pid)
    big = {"model": str(cluster.model), "messages": [{"role": "user", "content": "x" * (14 << 20)}]}
    response = httpx.post(cluster.url + "/v1/chat/completions", json=big, timeout=60)
    assert_openai_error(response, 413)
    grown = _peak_rss(pid) - before
    print(f"a 14 MB body: 413, the head's peak RSS grew {grown / 2**20:.1f} MiB")
    assert grown < 200 << 20
    # Under the limit but far over the context: refused before it is tokenized.
    big["messages"][0]["content"] = "The fox and the crow. " * 180_000  # 3.96 MB
    response = httpx.post(cluster.url + "/v1/chat/completions", json=big, timeout=60)
    assert assert_openai_error(response, 400)["code"] == "context_length_exceeded"
    grown = _peak_rss(pid) - before
    print(f"a 3.96 MB prompt: 400, the head's peak RSS grew {grown / 2**20:.1f} MiB in all")
    assert grown < 50 << 20, f"a 4 MB body grew the head's peak RSS by {grown >> 20} MiB"
    assert chat(cluster, max_tokens=2).status_code == 200  # and it still serves


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def test_two_thousand_idle_connections_leave_the_head_serving(cluster):
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2200:
        pytest.skip(f"this machine allows {hard} open files")
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (max(soft, 4096) if hard == resource.RLIM_INFINITY else hard, hard)
    )
    port = urlsplit(cluster.url).port
    idle = []
    try:
        for _ in range(2000):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        answer = chat(cluster, max_tokens=2)
        assert answer.status_code == 200, answer.text
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _copy(model: Path, root: Path) -> Path:
    import shutil

    copy = root / "copy"
    shutil.copytree(model, copy)
    return copy


def _weights(model: Path) -> Path:
    return sorted(model.glob("model*.safetensors"))[0]


def test_broken_models_are_4xx_naming_the_problem_and_the_loaded_one_keeps_serving(
    cluster, tmp_path
):
    import json

    def refused(model: Path) -> str:
        response = cluster.post("/v1/load_model", {"model": str(model)})
        message = assert_openai_error(response, 400)["message"]
        assert chat(cluster, max_tokens=2).status_code == 200  # the old model still answers
        return message

    corrupt = _copy(Path(cluster.model), tmp_path / "corrupt")
    data = bytearray(_weights(corrupt).read_bytes())
    data[8:24] = b"\xff" * 16  # inside the JSON header
    _weights(corrupt).write_bytes(bytes(data))
    assert "not a valid safetensors file" in refused(corrupt)

    truncated = _copy(Path(cluster.model), tmp_path / "truncated")
    with _weights(truncated).open("r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    message = refused(truncated)
    assert "truncated" in message and _weights(truncated).name in message

    wide = _copy(Path(cluster.model), tmp_path / "wide")
    config = json.loads((wide / "config.json").read_text())
    config["hidden_size"] = 65536
    (wide / "config.json").write_text(json.dumps(config))
    assert "hidden_size" in refused(wide)

    # A config.json that is some other file: its content is never echoed.
    other = _copy(Path(cluster.model), tmp_path / "other")
    (other / "config.json").unlink()
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    (other / "config.json").symlink_to(secret)
    message = refused(other)
    assert "not valid JSON" in message and "hunter2" not in message and "char" not in message
    # A path that exists but is no model answers as one that does not exist.
    answers = []
    for path in (tmp_path / "no-such-dir", tmp_path, secret):
        response = cluster.post("/v1/load_model", {"model": str(path)})
        answers.append(assert_openai_error(response, 404)["message"].replace(str(path), "P"))
    assert len(set(answers)) == 1, answers
    assert cluster.get("/health").json()["state"] == "loaded"


def test_a_context_beyond_the_models_is_refused(cluster):
    too_long = cluster.post(
        "/v1/prepare_topology", {"model": str(cluster.model), "context": 1 << 20}
    )
    assert "trained for" in assert_openai_error(too_long, 400, "context")["message"]
