"""`dlm serve` over HTTP: the OpenAI routes (the official `openai` client, unchanged), both streaming modes,
continuous batching (a request's tokens for a seed are the same alone, beside others and as `generate` gives them),
the bounded queue (429 + Retry-After), disconnects, the time limit, the API key, and bad input (each a clear 4xx,
the server serving others after it)."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tests.serve.conftest import LiveServer, generated_texts, slow_steps

openai = pytest.importorskip("openai")


def post(server, route, body, **kw):
    return requests.post(server.url + route, json=body, timeout=60, **kw)


def events(response) -> list:
    """The parsed `data:` events of a server-sent-event response ("[DONE]" kept as a string)."""
    out = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def reference(model, prompt, max_tokens, seed, steps, n=1):
    """What `generate` gives for the request (the same canvas, sampler and per-row seeds), cut at EOS and decoded
    as the server decodes."""
    gen = model.generate(prompt, gen_length=max_tokens, steps=steps, seed=seed, num_samples=n, precision="32")
    return generated_texts(model, gen)


# ------------------------------------------------------------------------------------------------ routes
def test_health_models_and_metrics(server):
    assert requests.get(server.url + "/health").json()["status"] == "ok"
    models = requests.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["context"] == 32
    post(server, "/v1/completions", {"prompt": "And", "max_tokens": 4, "seed": 0}).raise_for_status()
    text = requests.get(server.url + "/metrics").text
    assert 'dlm_requests_total{route="/v1/completions",status="200"}' in text
    for name in ("dlm_generated_tokens_total", "dlm_row_nfe_total", "dlm_queue_length", "dlm_request_seconds_bucket",
                 "dlm_request_seconds_count"):
        assert name in text, name
    tokens = [l for l in text.splitlines() if l.startswith("dlm_generated_tokens_total ")]
    assert int(tokens[0].split()[1]) >= 4


def test_openai_client_completions_stream_and_fim(server, golden_mdlm):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="tiny", prompt="And the king", max_tokens=8, seed=3,
                                    extra_body={"steps": 8})
    assert out.choices[0].text == reference(golden_mdlm, "And the king", 8, 3, 8)[0]
    assert out.usage.completion_tokens <= 8 and out.choices[0].finish_reason in ("stop", "length")
    pieces = list(client.completions.create(model="tiny", prompt="And the king", max_tokens=8, seed=3, stream=True,
                                            extra_body={"steps": 8}))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == out.choices[0].text
    assert pieces[-1].choices[0].finish_reason == out.choices[0].finish_reason
    fim = client.completions.create(model="tiny", prompt="And the", suffix=" of the land", max_tokens=6, seed=1,
                                    extra_body={"steps": 6})
    assert isinstance(fim.choices[0].text, str)
    shape = post(server, "/v1/fim/completions", {"prompt": "And the", "suffix": " of the land", "max_tokens": 6,
                                                 "seed": 1, "steps": 6}).json()
    assert shape["choices"][0]["text"] == fim.choices[0].text
    two = client.completions.create(model="tiny", prompt="And", max_tokens=6, n=2, seed=4, extra_body={"steps": 6})
    assert [c.text for c in two.choices] == reference(golden_mdlm, "And", 6, 4, 6, n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


def test_openai_client_chat(server, golden_mdlm, monkeypatch):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    monkeypatch.setattr(golden_mdlm.tokenizer, "chat_template",
                        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:",
                        raising=False)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                         seed=2, extra_body={"steps": 6})
    assert out.choices[0].message.role == "assistant" and isinstance(out.choices[0].message.content, str)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, seed=2, stream=True, extra_body={"steps": 6}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content


def test_diffusing_stream_sends_a_canvas_per_step(server):
    r = post(server, "/v1/completions", {"prompt": "And the king", "max_tokens": 8, "steps": 8, "seed": 5,
                                         "stream": True, "diffusing": True, "sampler": "ancestral"}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r)
    assert got[-1] == "[DONE]"
    snaps = [e["choices"][0] for e in got[:-1] if "masks_left" in e["choices"][0]]
    assert len(snaps) >= 8  # one per step (the final argmax may be one more)
    assert snaps[0]["masks_left"] <= 8 and snaps[-1]["masks_left"] == 0
    left = [s["masks_left"] for s in snaps]
    assert left == sorted(left, reverse=True)  # masked diffusion: committed tokens stay
    for s in snaps:
        assert len(s["tokens"]) == 8 and sum(t is None for t in s["tokens"]) == s["masks_left"]
        assert s["text"].count("\u2591") == s["masks_left"]
    assert snaps[-1]["nfe"] >= 1 and [s["step"] for s in snaps] == sorted(s["step"] for s in snaps)
    final = got[-2]["choices"][0]
    assert final["finish_reason"] in ("stop", "length")
    plain = post(server, "/v1/completions", {"prompt": "And the king", "max_tokens": 8, "steps": 8, "seed": 5,
                                             "sampler": "ancestral"}).json()
    assert final["text"] == plain["choices"][0]["text"]


# ------------------------------------------------------------------------------------------------ batching
def test_tokens_for_a_seed_are_the_same_alone_and_joining_a_running_batch(server, golden_mdlm):
    """Request A alone, then A joining mid-flight a batch of others (other prompts, lengths, seeds, n): the same
    text, and the text `generate` gives."""
    body = {"prompt": "And the king said", "max_tokens": 12, "steps": 12, "seed": 7, "temperature": 1.0,
            "sampler": "ancestral"}
    alone = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    assert alone == reference(golden_mdlm, "And the king said", 12, 7, 12)[0]
    restore = slow_steps(server.engine, 0.01)
    try:
        others = [{**body, "prompt": p, "seed": s, "n": n} for p, s, n in (("The Lord", 1, 2), ("And", 2, 1),
                                                                           ("To be, or not to be", 3, 3))]
        first = post(server, "/v1/completions", {**others[0], "stream": True, "diffusing": True}, stream=True)
        lines = first.iter_lines(decode_unicode=True)
        next(line for line in lines if line.startswith("data: "))  # the batch is running
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, server, "/v1/completions", b) for b in (others[1], body, others[2])]
            results = [f.result().json() for f in futures]
        rest = list(lines)
    finally:
        restore()
    assert results[1]["choices"][0]["text"] == alone
    assert [c["text"] for c in results[2]["choices"]] == reference(golden_mdlm, "To be, or not to be", 12, 3, 12, 3)
    assert any("[DONE]" in line for line in rest)
    assert server.engine.stats["network_calls"] < server.engine.stats["row_calls"]  # rows shared calls


def test_64_concurrent_clients_each_answered_once(server):
    before = dict(server.engine.stats)
    bodies = [{"prompt": ["And", "The Lord", "To be"][i % 3], "max_tokens": 4 + i % 5, "steps": 4 + i % 5, "seed": i,
               "stream": i % 4 == 0, "user": f"client-{i}"} for i in range(64)]

    def call(body):
        r = post(server, "/v1/completions", body, stream=body["stream"])
        if body["stream"]:
            got = events(r)
            assert got[-1] == "[DONE]" and got[-2]["choices"][0]["finish_reason"] is not None
            return r.status_code, got[0]["id"]
        return r.status_code, r.json()["id"]

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(call, bodies))
    assert [s for s, _ in answers] == [200] * 64
    assert len({i for _, i in answers}) == 64  # one answer per request, none twice
    assert server.engine.stats["jobs_ok"] - before.get("jobs_ok", 0) == 64
    assert server.engine.queue_length == 0 and server.engine.active_rows == 0


def test_full_queue_answers_429_with_retry_after(golden_mdlm, one_thread_module):
    from dlm.serve import create_app

    with LiveServer(create_app(golden_mdlm, precision="32", max_rows=1, max_queue=2)) as s:
        s.engine.pause()
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(post, s, "/v1/completions", {"prompt": "And", "max_tokens": 4, "seed": i})
                       for i in range(2)]
            deadline = __import__("time").monotonic() + 10
            while s.engine.queue_length < 2 and __import__("time").monotonic() < deadline:
                __import__("time").sleep(0.01)
            busy = post(s, "/v1/completions", {"prompt": "And", "max_tokens": 4})
            assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["error"]["type"] == "rate_limit_error"
            s.engine.resume()
            assert [w.result().status_code for w in waiting] == [200, 200]


def test_disconnect_mid_stream_cancels_the_rows(server):
    engine = server.engine
    before = engine.stats["jobs_cancelled"]
    restore = slow_steps(engine, 0.05)
    try:
        r = post(server, "/v1/completions", {"prompt": "And", "max_tokens": 16, "steps": 16, "seed": 0, "stream": True,
                                             "diffusing": True}, stream=True)
        lines = r.iter_lines(decode_unicode=True)
        next(line for line in lines if line.startswith("data: "))
        r.close()  # the client goes away after its first snapshot
        import time
        deadline = time.monotonic() + 10
        while engine.stats["jobs_cancelled"] == before and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        restore()
    assert engine.stats["jobs_cancelled"] == before + 1
    assert engine.active_rows == 0
    assert post(server, "/v1/completions", {"prompt": "And", "max_tokens": 4}).status_code == 200


def test_request_time_limit(golden_mdlm, one_thread_module):
    from dlm.serve import create_app

    with LiveServer(create_app(golden_mdlm, precision="32", request_timeout=0.2)) as s:
        restore = slow_steps(s.engine, 0.05)
        try:
            r = post(s, "/v1/completions", {"prompt": "And", "max_tokens": 16, "steps": 16})
        finally:
            restore()
        assert r.status_code == 504 and "time limit" in r.json()["error"]["message"]
        assert post(s, "/v1/completions", {"prompt": "And", "max_tokens": 4, "steps": 4}).status_code == 200


def test_api_key_guards_every_route_but_health(golden_mdlm):
    from fastapi.testclient import TestClient

    from dlm.serve import create_app

    with TestClient(create_app(golden_mdlm, precision="32", api_key="s3cret")) as c:
        assert c.get("/health").status_code == 200
        for method, route in (("get", "/v1/models"), ("get", "/metrics"), ("post", "/v1/completions"),
                              ("post", "/v1/chat/completions"), ("post", "/v1/fim/completions")):
            r = getattr(c, method)(route)
            assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"], route
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post("/v1/completions", json={"prompt": "And", "max_tokens": 3},
                    headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


# ------------------------------------------------------------------------------------------------ bad input
BAD = [
    ("malformed JSON", b'{"prompt": "And", "max_tokens": ', 400, "not valid JSON"),
    ("not an object", b'["And"]', 400, "JSON object"),
    ("unknown field", b'{"prompt": "And", "max_tokenz": 4}', 400, "max_tokenz: unknown field"),
    ("negative steps", b'{"prompt": "And", "steps": -3}', 400, "steps"),
    ("zero max_tokens", b'{"prompt": "And", "max_tokens": 0}', 400, "max_tokens"),
    ("top_p above 1", b'{"prompt": "And", "top_p": 1.5}', 400, "top_p"),
    ("prompt longer than the context", json.dumps({"prompt": "And the king said unto " * 10}).encode(), 400,
     "context"),
    ("max_tokens past the context", b'{"prompt": "And", "max_tokens": 40}', 400, "context (32)"),
    ("non-UTF-8 body", b'{"prompt": "\xff\xfe caf\xe9"}', 400, "not UTF-8"),
    ("lone surrogate", b'{"prompt": "abc\\ud800"}', 400, "UTF-8"),
    ("unknown sampler", b'{"prompt": "And", "sampler": "nope"}', 400, "unknown sampler"),
    ("option the sampler lacks", b'{"prompt": "And", "sampler": "first_hitting", "steps": 4}', 400, "steps"),
    ("unknown sampler option", b'{"prompt": "And", "options": {"wibble": 2}}', 400, "wibble"),
    ("10 MB body", b'{"prompt": "' + b"a" * (10 << 20) + b'"}', 413, "at most"),
]


@pytest.mark.parametrize("what,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_and_the_server_serves_on(server, what, body, status, words):
    r = requests.post(server.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"], error
    ok = post(server, "/v1/completions", {"prompt": "And", "max_tokens": 3, "steps": 3})
    assert ok.status_code == 200


def test_ten_megabyte_chunked_body_is_refused(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = requests.post(server.url + "/v1/completions", data=chunks(), headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code == 413


# ------------------------------------------------------------------------------------------------ edits
def test_edits_route_gives_model_edit_and_streams_its_canvas(server, golden_mdlm):
    text = "And the king said unto the people"
    direct = golden_mdlm.edit(text, [(8, 12)], seed=1)
    got = post(server, "/v1/edits", {"text": text, "spans": [[8, 12]], "seed": 1}).json()
    assert got["object"] == "edit" and got["choices"][0]["text"] == got["text"] == direct.text
    assert got["changes"] == [c.to_dict() for c in direct.changes] and got["nfe"] == direct.nfe
    auto = post(server, "/v1/edits", {"text": text, "seed": 2, "max_rounds": 2}).json()
    assert auto["mode"] == "auto" and auto["text"] == golden_mdlm.edit(text, seed=2, max_rounds=2).text
    r = post(server, "/v1/edits", {"text": text, "spans": [[8, 12]], "seed": 1, "stream": True, "diffusing": True},
             stream=True)
    chunks = events(r)
    assert chunks[-1] == "[DONE]"
    snaps = [c["choices"][0] for c in chunks[:-1] if "masks_left" in c["choices"][0]]
    assert snaps and snaps[0]["masks_left"] >= 1 and snaps[-1]["masks_left"] == 0
    assert chunks[-2]["choices"][0]["text"] == direct.text and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    for body, words in (({"text": "abc", "spans": [[5, 2]]}, "outside the text"), ({"text": ""}, "empty"),
                        ({"text": "abc", "spans": [[0, 1, 2, 3]]}, "[start, end]"),
                        ({"text": "abc", "max_rounds": 0}, "max_rounds"), ({"txt": "abc"}, "txt: unknown field")):
        bad = post(server, "/v1/edits", body)
        assert bad.status_code == 400 and words in bad.json()["error"]["message"], (body, bad.text)


def test_a_plain_request_whose_client_goes_away_is_cancelled(server):
    import socket
    import time

    engine = server.engine
    before = engine.stats["jobs_cancelled"]
    restore = slow_steps(engine, 0.05)
    try:
        body = json.dumps({"prompt": "And", "max_tokens": 16, "steps": 16}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 10
            while engine.active_rows == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        deadline = time.monotonic() + 10  # the connection is closed: the rows leave at a step boundary
        while engine.stats["jobs_cancelled"] == before and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        restore()
    assert engine.stats["jobs_cancelled"] == before + 1 and engine.active_rows == 0
