"""The OpenAI-compatible server, tested with real HTTP requests on loopback."""

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_generate import _argmax_loop, save_tiny_checkpoint

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")

from onebit.serve import App, ServeConfig, ServerThread

TIMEOUT = 60  # seconds for any one HTTP exchange; a hung server fails the test instead of hanging it


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    from onebit.generate import load_for_generation

    d = tmp_path_factory.mktemp("serve") / "q"
    save_tiny_checkpoint(d)
    return load_for_generation(str(d))


@pytest.fixture(scope="module")
def server(model_tok):
    model, tok = model_tok
    cfg = ServeConfig(model_name="tiny", max_batch_size=8, max_queue=16, max_body_bytes=4096, max_prompt_tokens=64,
                      max_new_tokens=32, batch_wait_s=0.05)  # fmt: skip
    app = App(model, tok, cfg)
    with ServerThread(app) as s:
        s.app = app
        yield s
    assert not s.thread.is_alive() and not app.engine._thread.is_alive()  # clean shutdown


def call(server, method, path, body=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        payload = r.read()
        return r.status, (json.loads(payload) if payload else None), dict(r.getheaders())
    finally:
        conn.close()


def stream(server, path, body):
    """POST with stream=true; returns the parsed SSE data events (the final '[DONE]' as a string)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        conn.request(
            "POST", path, body=json.dumps(body | {"stream": True}), headers={"Content-Type": "application/json"}
        )
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        events = []
        for line in r.read().decode().split("\n"):
            if line.startswith("data: "):
                d = line[len("data: ") :]
                events.append(d if d == "[DONE]" else json.loads(d))
        return events
    finally:
        conn.close()


def greedy_text(model_tok, ids, n):
    model, tok = model_tok
    return tok.decode(_argmax_loop(model, ids, n), skip_special_tokens=True)


def test_health_and_models(server):
    status, body, _ = call(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    status, body, _ = call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]


def test_completion_is_the_greedy_continuation(server, model_tok):
    _, tok = model_tok
    status, body, _ = call(server, "POST", "/v1/completions",
                           {"model": "tiny", "prompt": "Once upon", "max_tokens": 7, "temperature": 0})  # fmt: skip
    assert status == 200, body
    ids = tok("Once upon")["input_ids"]
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == greedy_text(model_tok, ids, 7)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 7, "total_tokens": len(ids) + 7}


def test_chat_completion_uses_the_chat_template(server, model_tok):
    from onebit.generate import chat_ids

    _, tok = model_tok
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    status, body, _ = call(
        server, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 5, "temperature": 0}
    )
    assert status == 200, body
    msg = body["choices"][0]["message"]
    assert body["object"] == "chat.completion" and msg["role"] == "assistant"
    ids = chat_ids(tok, msgs)
    assert ids == tok("<system>Be brief.\n<user>Hi!\n<assistant>", add_special_tokens=False)["input_ids"]
    assert msg["content"] == greedy_text(model_tok, ids, 5) and body["usage"]["prompt_tokens"] == len(ids)


def test_streaming_matches_non_streaming(server):
    req = {"prompt": "stream this", "max_tokens": 9, "temperature": 0}
    _, full, _ = call(server, "POST", "/v1/completions", req)
    events = stream(server, "/v1/completions", req)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert len(events) >= 3  # several deltas, not one blob
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full["choices"][0]["text"]

    chat = {"messages": [{"role": "user", "content": "stream"}], "max_tokens": 6, "temperature": 0}
    _, full, _ = call(server, "POST", "/v1/chat/completions", chat)
    events = stream(server, "/v1/chat/completions", chat)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"} and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == full["choices"][0]["message"]["content"]


def test_concurrent_requests_are_batched_and_correct(server, model_tok):
    _, tok = model_tok
    prompts = [f"request number {i}" + "!" * i for i in range(8)]
    before = len(server.app.engine.batches)

    def one(i):
        body = {"prompt": prompts[i], "max_tokens": 4 + i, "temperature": 0}
        if i % 3 == 0:
            return stream(server, "/v1/completions", body)
        return call(server, "POST", "/v1/completions", body)

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    for i, res in enumerate(results):
        expect = greedy_text(model_tok, tok(prompts[i])["input_ids"], 4 + i)
        if i % 3 == 0:
            assert "".join(e["choices"][0]["text"] for e in res[:-1]) == expect
        else:
            assert res[0] == 200 and res[1]["choices"][0]["text"] == expect
    sizes = server.app.engine.batches[before:]
    assert sum(sizes) == 8 and max(sizes) > 1  # waiting requests shared generate() calls


def test_sampling_with_seed_is_reproducible(server):
    req = {"prompt": "dice", "max_tokens": 12, "temperature": 1.0, "top_p": 0.95, "seed": 7}
    a, b = call(server, "POST", "/v1/completions", req), call(server, "POST", "/v1/completions", req)
    assert a[0] == b[0] == 200 and a[1]["choices"][0]["text"] == b[1]["choices"][0]["text"]


def test_stop_strings(server, model_tok):
    _, tok = model_tok
    full = greedy_text(model_tok, tok("stopping")["input_ids"], 10)
    stop = full[3:5]
    _, body, _ = call(server, "POST", "/v1/completions", {"prompt": "stopping", "max_tokens": 10, "temperature": 0,
                                                           "stop": [stop]})  # fmt: skip
    assert body["choices"][0]["text"] == full[: full.find(stop)] and body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"[1, 2]", 400),
        ("/v1/completions", {"max_tokens": 3}, 400),  # no prompt
        ("/v1/completions", {"prompt": ""}, 400),
        ("/v1/completions", {"prompt": "x", "max_tokens": 33}, 400),  # over the server's max_new_tokens
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
        ("/v1/completions", {"prompt": "y" * 65}, 400),  # 65 tokens > max_prompt_tokens
        ("/v1/completions", {"prompt": "z" * 5000}, 413),  # body > max_body_bytes
        ("/v1/chat/completions", {"messages": []}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, path, body, status):
    raw = body if isinstance(body, bytes) else None
    got, payload, _ = call(server, "POST", path, body=None if raw else body, raw=raw)
    assert got == status, payload
    assert payload["error"]["message"] and payload["error"]["type"] == "invalid_request_error"
    assert call(server, "GET", "/health")[0] == 200
    assert call(server, "POST", "/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_wrong_method_and_route(server):
    status, body, _ = call(server, "GET", "/v1/completions")
    assert status == 405 and body["error"]["message"]
    status, body, _ = call(server, "GET", "/nope")
    assert status == 404 and body["error"]["message"]


def test_overload_gives_503_then_recovers(model_tok, monkeypatch):
    """Worker held busy, queue (1) full: the next request is refused with 503 + Retry-After."""
    import onebit.serve as serve_mod

    model, tok = model_tok
    entered, release = threading.Event(), threading.Event()
    real = serve_mod.generate_batch

    def gated(*a, **kw):
        entered.set()
        assert release.wait(TIMEOUT)
        return real(*a, **kw)

    monkeypatch.setattr(serve_mod, "generate_batch", gated)
    app = App(model, tok, ServeConfig(max_batch_size=1, max_queue=1, batch_wait_s=0.0))
    with ServerThread(app) as s, ThreadPoolExecutor(2) as ex:
        body = {"prompt": "busy", "max_tokens": 2}
        first = ex.submit(call, s, "POST", "/v1/completions", body)
        assert entered.wait(TIMEOUT)  # the worker holds request 1
        second = ex.submit(call, s, "POST", "/v1/completions", body)
        for _ in range(1000):  # wait until request 2 sits in the queue
            if app.engine.queue.qsize() == 1:
                break
            threading.Event().wait(0.01)
        status, payload, headers = call(s, "POST", "/v1/completions", body)
        assert status == 503 and payload["error"]["code"] == "overloaded" and headers.get("retry-after") == "1"
        release.set()
        assert first.result(TIMEOUT)[0] == 200 and second.result(TIMEOUT)[0] == 200
        assert call(s, "POST", "/v1/completions", body)[0] == 200


def test_client_disconnect_mid_stream_cancels_and_server_continues(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "long", "max_tokens": 32, "stream": True}))
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.close()  # walk away mid-stream
    status, body, _ = call(server, "POST", "/v1/completions", {"prompt": "after", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


@pytest.mark.slow
def test_smollm2_quantize_from_pretrained_generate_serve(tmp_path, capsys):
    """The README path on the real model (2 decoder blocks to keep it quick): CLI quantize -> transformers
    from_pretrained -> generate -> onebit info -> HTTP chat completion with SmolLM2's chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import onebit.hf  # noqa: F401
    from onebit.cli import main
    from onebit.nn import BinaryLinear

    out = tmp_path / "q"
    assert main(["quantize", "--model", "smollm2-135m", "--method", "rtn", "--num-layers", "2", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert sum(isinstance(m, BinaryLinear) for m in model.modules()) == 14
    ids = tok("The capital of France is")["input_ids"]
    gen = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert gen[0, len(ids) :].tolist() == _argmax_loop(model, ids, 5)
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized_linear_bytes"] < info["fp16_linear_bytes"] / 3 and info["bits_per_weight"] < 2
    with ServerThread(App(model, tok, ServeConfig(model_name="smol", max_new_tokens=8))) as s:
        msgs = [{"role": "user", "content": "Say hi."}]
        status, body, _ = call(s, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 4, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] <= 4
        chat = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert body["usage"]["prompt_tokens"] == len(tok(chat, add_special_tokens=False)["input_ids"])


def test_compiled_single_requests(model_tok, monkeypatch):
    """ServeConfig(compile=True): warm_up_compiled compiles before serving; a single request then
    decodes compiled without compiling again and gives the greedy continuation; a batch of
    several decodes eagerly and is still correct."""
    from torch._dynamo.utils import counters

    from onebit.serve import warm_up_compiled

    import onebit.serve as srv

    model, tok = model_tok
    assert warm_up_compiled(model, tok) > 0
    calls = []  # (batch size, compile) of every generate_batch call the engine makes
    real = srv.generate_batch
    monkeypatch.setattr(srv, "generate_batch",
                        lambda m, t, reqs, **kw: calls.append((len(reqs), kw["compile"])) or real(m, t, reqs, **kw))
    cfg = ServeConfig(model_name="tiny", max_batch_size=4, max_new_tokens=16, batch_wait_s=0.2, compile=True)
    app = App(model, tok, cfg)
    with ServerThread(app) as s:
        graphs = counters["stats"]["unique_graphs"]
        status, body, _ = call(s, "POST", "/v1/completions", {"model": "tiny", "prompt": "Once upon", "max_tokens": 6,
                                                                  "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["text"] == greedy_text(model_tok, tok("Once upon")["input_ids"], 6)
        assert counters["stats"]["unique_graphs"] == graphs  # the warm-up's graph served it
        prompts = ["The cat", "A dog sat"]
        out = [None, None]

        def ask(i):
            out[i] = call(s, "POST", "/v1/completions", {"model": "tiny", "prompt": prompts[i], "max_tokens": 5, "temperature": 0})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (status, body, _) in enumerate(out):
            assert status == 200, body
            assert body["choices"][0]["text"] == greedy_text(model_tok, tok(prompts[i])["input_ids"], 5)
    # Single requests compiled, batches (when the two arrived together) eager.
    assert calls[0] == (1, True) and all(c == (n == 1) for n, c in calls)
