"""OpenAI-compatible HTTP server for onebit checkpoints (starlette + uvicorn).

    onebit serve DIR [--host 127.0.0.1 --port 8000]

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the
tokenizer's chat template), both with `"stream": true` for server-sent events.

Design: the HTTP side is asyncio; the model runs in one worker thread. Requests are validated
and tokenized on the event loop, then put on a bounded queue (full -> 503 + Retry-After). The
worker takes the first waiting request, gathers whatever else is waiting (up to
max_batch_size), groups requests with equal sampling settings and runs each group as one
left-padded `model.generate()` (onebit.generate.generate_batch). Each new token goes back to
its request's asyncio queue through `loop.call_soon_threadsafe`. A client that disconnects
or times out cancels its row at the next decoding step; shutdown cancels everything and joins
the worker. Request bodies, prompt lengths and max_tokens are bounded (413 / 400).
Binds 127.0.0.1 by default: there is no authentication.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from onebit.generate import Request, chat_ids, generate_batch


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "onebit"
    max_batch_size: int = 8
    max_queue: int = 64  # waiting requests; one more gets 503
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512  # upper bound for a request's max_tokens
    batch_wait_s: float = 0.005  # how long the worker lets a batch fill after the first request
    request_timeout_s: float = 600.0
    head_dtype: str | None = None  # "float16" / "bfloat16" / "int8": onebit.head.compact_head at load
    # Decode single-request batches under torch.compile (onebit.generate, compile=True): one
    # compile per 256-token length bucket at its first use (the first bucket before serving);
    # batches of several requests decode eagerly (each batch size would compile again).
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# ---------------------------------------------------------------------------- engine


@dataclass
class Job:
    """One request in flight: its generation request, text state and event channel to the client."""

    req: Request
    tokenizer: Any
    loop: asyncio.AbstractEventLoop
    stop: tuple[str, ...] = ()
    seed: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded text, cut at a stop string
    sent: int = 0  # characters already sent to a streaming client
    stopped: bool = False

    def __post_init__(self) -> None:
        self.req.on_token, self.req.cancelled = self._on_token, self.cancel.is_set

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel.set()

    def _on_token(self, tok: int) -> None:  # worker thread
        if self.stopped:
            return
        self.tokens.append(tok)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            text, self.stopped = text[: min(hits)], True
            self.cancel.set()
        self.text = text
        # Hold back an incomplete UTF-8 character and anything that may begin a stop string.
        hold = 0 if self.stopped else max([len(s) - 1 for s in self.stop] + [0])
        safe = len(text) - hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > self.sent:
            self.emit("delta", text[self.sent : safe])
            self.sent = safe

    def finish(self, reason: str) -> None:  # worker thread
        if self.stopped:
            reason = "stop"
        if len(self.text) > self.sent:
            self.emit("delta", self.text[self.sent :])
            self.sent = len(self.text)
        usage = {"prompt_tokens": len(self.req.prompt_ids), "completion_tokens": len(self.tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.emit("done", {"finish_reason": reason, "usage": usage})


class Engine:
    """Bounded queue + one worker thread that batches waiting requests into generate() calls."""

    def __init__(self, model, tokenizer, config: ServeConfig) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=config.max_queue)
        self._stopping = threading.Event()
        self.batches: list[int] = []  # sizes of the generate() calls run (observability / tests)
        self._current: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="onebit-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise HTTPError(503, "server is shutting down", code="shutting_down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise HTTPError(
                503, f"server overloaded: {self.config.max_queue} requests waiting", code="overloaded"
            ) from None

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None or self._stopping.is_set():
                break
            batch = [job]
            deadline = time.monotonic() + self.config.batch_wait_s
            while len(batch) < self.config.max_batch_size:
                try:
                    nxt = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if nxt is None:
                    self._stopping.set()
                    break
                batch.append(nxt)
            self._run_batch(batch)
        self._drain()

    def _run_batch(self, batch: list[Job]) -> None:
        self._current = batch
        groups: dict[tuple, list[Job]] = {}
        for j in batch:
            if j.cancel.is_set():
                j.finish("cancelled")
                continue
            key = j.req.sampling_key + ((j.seed, id(j)) if j.seed is not None else ())  # seeded: run alone
            groups.setdefault(key, []).append(j)
        for jobs in groups.values():
            self.batches.append(len(jobs))
            try:
                results = generate_batch(self.model, self.tokenizer, [j.req for j in jobs], seed=jobs[0].seed,
                                         compile=self.config.compile and len(jobs) == 1)  # fmt: skip
            except Exception as e:  # a failing batch must not kill the worker
                for j in jobs:
                    j.emit("error", f"generation failed: {type(e).__name__}: {e}")
                continue
            for j, r in zip(jobs, results):
                j.finish(r.finish_reason)

    def _drain(self) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit("error", "server is shutting down")

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        for j in list(self.queue.queue) + list(self._current):
            if j is not None:
                j.cancel.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            self._drain()
            self.queue.put_nowait(None)
        self._thread.join(timeout)


# ---------------------------------------------------------------------------- HTTP


def _error(e: HTTPError):
    from starlette.responses import JSONResponse

    kind = "invalid_request_error" if e.status < 500 else "server_error"
    headers = {"Retry-After": "1"} if e.status == 503 else None
    body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=headers)


async def _read_json(request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise HTTPError(413, f"request body larger than {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"request body larger than {limit} bytes", code="body_too_large")
    try:
        data = json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return data


def _number(body: dict, name: str, default, lo, hi, kind=float):
    v = body.get(name, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise HTTPError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", param=name)
    if not lo <= v <= hi:
        raise HTTPError(400, f"{name} must be in [{lo}, {hi}], got {v}", param=name)
    return kind(v)


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop):
        raise HTTPError(400, "stop must be a string or a list of at most 4 non-empty strings", param="stop")
    return tuple(stop)


class App:
    """The starlette application around one model; `app.asgi` is what uvicorn runs."""

    def __init__(self, model, tokenizer, config: ServeConfig | None = None) -> None:
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException as StarletteHTTPException
        from starlette.routing import Route

        self.model, self.tokenizer, self.config = model, tokenizer, config or ServeConfig()
        self.engine: Engine | None = None
        self.created = int(time.time())

        @asynccontextmanager
        async def lifespan(_app):
            self.engine = Engine(self.model, self.tokenizer, self.config)
            try:
                yield
            finally:
                await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]

        async def http_exception(request, exc):  # 404 / 405 from routing, as OpenAI-style JSON errors
            return _error(HTTPError(exc.status_code, str(exc.detail)))

        async def server_error(request, exc):
            return _error(HTTPError(500, f"internal error: {type(exc).__name__}"))

        handlers = {StarletteHTTPException: http_exception, Exception: server_error}
        self.asgi = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)

    async def health(self, request):
        from starlette.responses import JSONResponse

        ok = self.engine is not None and self.engine._thread.is_alive()
        body = {"status": "ok" if ok else "unavailable", "queued": self.engine.queue.qsize() if self.engine else 0}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def models(self, request):
        from starlette.responses import JSONResponse

        card = {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "onebit"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request):
        try:
            body = await _read_json(request, self.config.max_body_bytes)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise HTTPError(400, "prompt must be a non-empty string", param="prompt")
            if len(prompt) > self.config.max_body_bytes:
                raise HTTPError(413, "prompt too long", param="prompt")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            return await self._generate(request, body, ids, chat=False)
        except HTTPError as e:
            return _error(e)

    async def chat_completions(self, request):
        try:
            body = await _read_json(request, self.config.max_body_bytes)
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise HTTPError(400, "messages must be a non-empty list", param="messages")
            for m in msgs:
                if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                        and isinstance(m.get("content"), str)):  # fmt: skip
                    raise HTTPError(400, "each message needs a role (system/user/assistant) and string content",
                                    param="messages")  # fmt: skip
            try:
                ids = chat_ids(self.tokenizer, [{"role": m["role"], "content": m["content"]} for m in msgs])
            except ValueError as e:
                raise HTTPError(400, str(e), param="messages") from None
            except Exception as e:  # a template that rejects the conversation (e.g. role order)
                raise HTTPError(400, f"chat template failed: {e}", param="messages") from None
            return await self._generate(request, body, ids, chat=True)
        except HTTPError as e:
            return _error(e)

    async def _generate(self, request, body: dict, ids: list[int], chat: bool):
        from starlette.responses import JSONResponse, StreamingResponse

        cfg = self.config
        model = body.get("model")
        if model is not None and model != cfg.model_name:
            raise HTTPError(
                404, f"model {model!r} not found; this server has {cfg.model_name!r}", "model", "model_not_found"
            )
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
            raise HTTPError(400, "only n = 1 is supported", param="n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise HTTPError(400, "stream must be a boolean", param="stream")
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_tokens = _number(body, key, 16 if not chat else min(256, cfg.max_new_tokens), 1, cfg.max_new_tokens, int)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise HTTPError(400, "top_p must be > 0", param="top_p")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise HTTPError(400, "seed must be a non-negative integer", param="seed")
        if len(ids) > cfg.max_prompt_tokens:
            raise HTTPError(400, f"prompt is {len(ids)} tokens; this server accepts at most {cfg.max_prompt_tokens}",
                            param="messages" if chat else "prompt", code="context_length_exceeded")  # fmt: skip
        job = Job(Request(list(ids), max_tokens, temperature, top_p), self.tokenizer, asyncio.get_running_loop(),
                  stop=_stop_strings(body), seed=seed)  # fmt: skip
        self.engine.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "created": int(time.time()), "model": cfg.model_name}
        if stream:
            return StreamingResponse(self._sse(job, head, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        text, done = [], None
        try:
            while done is None:
                kind, payload = await asyncio.wait_for(job.events.get(), cfg.request_timeout_s)
                if kind == "delta":
                    text.append(payload)
                elif kind == "done":
                    done = payload
                else:
                    raise HTTPError(500 if "failed" in payload else 503, payload)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"generation took longer than {cfg.request_timeout_s} s") from None
        finally:
            job.cancel.set()  # no-op when finished; stops the row if the client went away
        out = "".join(text)
        reason = done["finish_reason"] if done["finish_reason"] != "cancelled" else "stop"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": reason}
            return JSONResponse(head | {"object": "chat.completion", "choices": [choice], "usage": done["usage"]})
        choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": reason}
        return JSONResponse(head | {"object": "text_completion", "choices": [choice], "usage": done["usage"]})

    async def _sse(self, job: Job, head: dict, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return "data: " + json.dumps(head | {"object": obj, "choices": [choice]}) + "\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                kind, payload = await asyncio.wait_for(job.events.get(), self.config.request_timeout_s)
                if kind == "delta":
                    yield chunk(payload, None)
                elif kind == "done":
                    reason = payload["finish_reason"] if payload["finish_reason"] != "cancelled" else "stop"
                    yield chunk(None if chat else "", reason)
                    break
                else:
                    err = {"error": {"message": payload, "type": "server_error", "param": None, "code": None}}
                    yield "data: " + json.dumps(err) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        except asyncio.TimeoutError:
            err = {"error": {"message": "generation timed out", "type": "server_error", "param": None, "code": None}}
            yield "data: " + json.dumps(err) + "\n\n"
        finally:
            job.cancel.set()  # client disconnected or finished: stop generating for it


# ---------------------------------------------------------------------------- running


class ServerThread:
    """Run an App under uvicorn in a background thread (tests, notebooks): `with ServerThread(app) as s: s.url`."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        cfg = app.config
        limit = cfg.max_queue + cfg.max_batch_size + 16  # open connections beyond the queue get 503 from uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app.asgi, log_level="warning", limit_concurrency=limit,
                                                    timeout_graceful_shutdown=5))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        t_end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def warm_up_compiled(model, tokenizer) -> float:
    """Compile the decode step of single requests in the first length bucket before serving (a
    two-token generation): the first requests then do not wait for it. Returns the seconds taken."""
    import sys

    t = time.perf_counter()
    print("onebit serve: compiling the decode step (--compile)...", file=sys.stderr)
    generate_batch(model, tokenizer, [Request([tokenizer.bos_token_id or 0], 2)], compile=True)
    return time.perf_counter() - t


def serve(path: str, config: ServeConfig | None = None) -> None:
    """Load a checkpoint directory with from_pretrained and serve it until SIGINT / SIGTERM."""
    import sys

    import uvicorn

    from onebit.generate import load_for_generation

    config = config or ServeConfig()
    model, tok = load_for_generation(path, head_dtype=config.head_dtype)
    if config.compile:
        warm_up_compiled(model, tok)
    app = App(model, tok, config)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"onebit serve: warning: listening on {config.host}, reachable from other machines; "
              "there is no authentication", file=sys.stderr)  # fmt: skip
    print(f"onebit serve: {path} as {config.model_name!r} on http://{config.host}:{config.port}/v1", file=sys.stderr)
    limit = config.max_queue + config.max_batch_size + 16
    uvicorn.run(app.asgi, host=config.host, port=config.port, log_level="info", limit_concurrency=limit,
                timeout_graceful_shutdown=5)  # fmt: skip


def add_parser(sub) -> None:
    """`onebit serve` (called by onebit.cli)."""
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a checkpoint (127.0.0.1 by default)")
    s.add_argument("dir", help="quantized checkpoint directory (with its tokenizer)")
    d = ServeConfig()
    s.add_argument("--host", default=d.host, help="interface to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=d.port)
    s.add_argument("--model-name", default=None, help="id reported by /v1/models (default: the directory name)")
    for name in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_new_tokens", "max_body_bytes"):
        s.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(d, name), help=f"default {getattr(d, name)}"
        )
    s.add_argument("--compile", action="store_true",
                   help="decode single requests under torch.compile (compiled at startup, 15-45 s; again for each "
                        "new 256-token length bucket); batched requests decode eagerly")  # fmt: skip
    from onebit.generate import add_head_option

    add_head_option(s)
    s.set_defaults(fn=_cli_serve)


def _cli_serve(args) -> int:
    from pathlib import Path

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError("onebit serve needs starlette and uvicorn: pip install 'onebit[serve]'") from None
    cfg = ServeConfig(
        host=args.host, port=args.port, model_name=args.model_name or Path(args.dir).resolve().name,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens, max_body_bytes=args.max_body_bytes, head_dtype=args.head_dtype,
        compile=args.compile,
    )  # fmt: skip
    serve(args.dir, cfg)
    return 0
