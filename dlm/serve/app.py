"""The HTTP side of `dlm serve`: FastAPI routes in OpenAI's shapes over the batching engine (dlm/serve/batcher.py).

    app = create_app(model)             # a DiffusionLM; uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions (`suffix`: fill in the middle; the same as POST /v1/fim/completions),
POST /v1/chat/completions, POST /v1/edits (DiffusionLM.edit: spans, a template or "auto"), GET /v1/models, GET /health, GET /metrics (Prometheus text), GET / (the page).
Every body is read here (size limit, UTF-8, JSON, then the pydantic model), so every bad input gets a 4xx naming
the problem in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from dlm.generation import given_rows
from dlm.guards import check_text
from dlm.pipeline import sample_seed
from dlm.sampler.registry import sampler_spec
from dlm.serve.batcher import Engine, Job, QueueFull
from dlm.serve.metrics import Metrics
from dlm.serve.schemas import ChatRequest, CompletionRequest, EditRequest, error_text

PAGE = Path(__file__).parent / "page"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}
PUBLIC = ("/health", "/", "/page/")  # no key needed: the health check and the static page (it asks for the key)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


def create_app(model, name: str | None = None, api_key: str | None = None, max_rows: int = 64,
               batch_rows: int = 16, max_queue: int = 128, request_timeout: float = 300.0,
               max_body: int = 1 << 20, precision: str = "auto", first_rows: int | None = 4,
               preempt: bool = True) -> FastAPI:
    """The server's app for a loaded DiffusionLM. name: the model id it answers to (default "dlm"); api_key: a
    Bearer key every route but /health and the page needs; max_rows / batch_rows / max_queue: the engine's bounds;
    first_rows / preempt: how newcomers take their first step (dlm/serve/batcher.py's Engine);
    request_timeout: seconds a request may take from its arrival; max_body: bytes a request body may have."""
    engine = Engine(model, max_rows=max_rows, batch_rows=batch_rows, max_queue=max_queue, precision=precision,
                    first_rows=first_rows, preempt=preempt)
    metrics = Metrics(engine)
    engine.on_finish = metrics.finished
    model_id = name or "dlm"
    created = int(time.time())

    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="dlm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.model = engine, metrics, model

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, e: HTTPError):
        return JSONResponse(error_body(e.status, e.message, e.param), status_code=e.status, headers=e.headers)

    app.add_middleware(Guard, api_key=api_key, metrics=metrics)

    # ------------------------------------------------------------------------------------ small routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "queue": engine.queue_length, "active_rows": engine.active_rows}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "dlm",
                                            "context": model.context, "process": model.process.name,
                                            "default_sampler": model.process.default_sampler,
                                            "edits": hasattr(model, "edit") and not model.is_autoregressive}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(PAGE / "index.html", media_type="text/html")

    @app.get("/page/{file}")
    async def page_file(file: str):
        path = PAGE / file
        if "/" in file or not path.is_file():
            raise HTTPError(404, f"no page file {file}")
        return FileResponse(path)

    # ------------------------------------------------------------------------------------ generation
    @app.post("/v1/completions")
    @app.post("/v1/fim/completions")  # Mercury's fill-in-the-middle route: the same body (prompt + suffix)
    async def completions(request: Request):
        req = await parse(request, CompletionRequest, max_body)
        return await answer(request, req, plan(req, "completion"), "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest, max_body)
        return await answer(request, req, plan(req, "chat"), "chat.completion")

    @app.post("/v1/edits")
    async def edits(request: Request):
        req = await parse(request, EditRequest, max_body)
        return await answer(request, req, plan_edit(req), "edit")

    def plan_edit(req) -> dict:
        """An edit runs whole in the engine thread (its rounds are not steps of one canvas): a call job."""
        if req.model is not None and req.model != model_id:
            raise HTTPError(404, f"this server serves the model '{model_id}', not '{req.model}' (GET /v1/models)",
                            "model")
        try:
            check_text("text", req.text)
            check_text("template", req.template)
            options = dict(req.options)
            if options:
                text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
                options = model.sampler_options(req.sampler, [f"{k}={text(v)}" for k, v in options.items()])
        except ValueError as e:
            raise HTTPError(400, str(e), "text") from None
        spans = None if req.spans is None else [tuple(x) for x in req.spans]
        if spans is not None and any(len(x) not in (2, 3) for x in spans):
            raise HTTPError(400, "each span is [start, end] or [start, end, n_tokens] (character offsets)", "spans")
        bos = model.tokenizer.bos_token_id is not None

        def call(job):
            rounds = {"base": 0, "last": 0}

            def callback(event):
                if event.step == 0:
                    rounds["base"] += rounds["last"]
                rounds["last"] = event.nfe
                if job.snapshots:
                    ids = event.tokens[0, int(bos):].tolist()
                    masked = (model.process.is_noise(event.tokens[0, int(bos):]).tolist()
                              if model.process.corruption == "absorbing" else [False] * len(ids))
                    text, pieces = engine.snapshot_of(ids, masked)
                    new = event.committed[0, int(bos):].nonzero().flatten().tolist()
                    conf = None if event.confidence is None else event.confidence[0, int(bos):]
                    job.first_event = job.first_event or time.monotonic()
                    job.sink(("snapshot", 0, {"text": text, "tokens": pieces, "step": event.step,
                                              "nfe": rounds["base"] + event.nfe, "masks_left": sum(masked),
                                              "committed": [[p, None if conf is None else round(float(conf[p]), 4)]
                                                            for p in new]}))
                return job.cancelled or job.expired(time.monotonic())

            tuning = {k: getattr(req, k) for k in ("max_rounds", "threshold", "budget", "groups")
                      if getattr(req, k) is not None}  # else edit's own defaults
            result = model.edit(req.text, spans, template=req.template, mode=req.mode, sampler=req.sampler,
                                steps=req.steps, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                softmask=req.softmask, feedback=req.feedback, callback=callback,
                                sampler_options=options, **tuning)
            out = result.to_dict()
            out["tokens"] = result.changed_tokens
            return {**out, "finish_reason": "stop", "seed": req.seed}

        return {"rows": [], "suffix": [], "gen_length": 0, "sampler": None, "key": (), "seeds": [], "seed": req.seed,
                "prompt_tokens": 0, "call": call}

    def plan(req, kind: str) -> dict:
        return plan_request(model, req, kind, model_id, min(batch_rows, max_rows))

    async def answer(request: Request, req, spec: dict, kind: str):
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def sink(message):
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, message)
            except RuntimeError:  # the loop has closed (the server is stopping)
                pass

        job = Job(f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}", spec["rows"],
                  spec["suffix"], spec["gen_length"], spec["sampler"], spec["key"], spec["seeds"], sink,
                  stop=req.stops() if kind != "edit" else [], snapshots=req.stream and req.diffusing,
                  deltas=req.stream and not req.diffusing and kind != "edit", timeout=request_timeout,
                  call=spec.get("call"))
        try:
            engine.submit(job)
        except QueueFull as e:
            after = engine.retry_after()
            raise HTTPError(429, f"the server is busy: {e}; retry after {after} s",
                            headers={"Retry-After": str(after)}) from None
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        head = {"id": job.id if kind != "edit" else "edit-" + job.id.split("-", 1)[1], "created": int(time.time()),
                "model": model_id}
        if req.stream:
            include_usage = bool((getattr(req, "stream_options", None) or {}).get("include_usage"))
            return StreamingResponse(stream(request, job, inbox, head, kind, spec, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        getter = None
        while True:  # the answer, watching the connection every 0.5 s (a client gone: its rows are cancelled)
            getter = getter or asyncio.ensure_future(inbox.get())
            done, _ = await asyncio.wait({getter}, timeout=0.5)
            if not done:
                if await request.is_disconnected():
                    getter.cancel()
                    job.cancel()
                    return Response(status_code=499)
                continue
            message, getter = getter.result(), None
            if message[0] == "done":
                return completion_body(head, kind, message[1], spec)
            if message[0] == "error":
                raise HTTPError(message[1], message[2])

    async def stream(request, job, inbox, head, kind, spec, include_usage):
        chunk_kind = kind if kind == "text_completion" else kind + ".chunk"
        try:
            if kind.startswith("chat"):
                yield sse({**head, "object": chunk_kind, "choices": [
                    {"index": j, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    for j in range(job.n)]})
            while True:
                message = await inbox.get()
                if message[0] in ("delta", "snapshot"):
                    _, j, payload = message
                    extra = payload if message[0] == "snapshot" else {}
                    text = payload["text"] if message[0] == "snapshot" else payload
                    yield sse({**head, "object": chunk_kind, "choices": [choice(kind, j, text, None, extra)]})
                elif message[0] == "done" and kind == "edit":
                    r = message[1][0]
                    yield sse({**head, "object": "edit.chunk", "choices": [
                        {"index": 0, "text": r["text"], "finish_reason": "stop", "changes": r["changes"],
                         "nfe": r["nfe"]}]})
                    yield "data: [DONE]\n\n"
                    return
                elif message[0] == "done":
                    results = message[1]
                    for j, r in enumerate(results):
                        text = r["text"] if job.snapshots else ""
                        yield sse({**head, "object": chunk_kind,
                                   "choices": [choice(kind, j, text, r["finish_reason"], {"nfe": r["nfe"]})]})
                    if include_usage:
                        yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage(results, spec)})
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield sse(error_body(message[1], message[2]))
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client went away (or the stream ended): rows still running are cancelled
            if not job.finished:
                job.cancel()

    return app


class Guard:
    """ASGI middleware (pure ASGI, so streaming and disconnects pass untouched): the API key on every route but
    /health and the page, and a count of each response's status for /metrics."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        public = path in PUBLIC or path.startswith("/page/")
        if self.api_key is not None and not public:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                response = JSONResponse(error_body(401, "missing or wrong API key: send the header "
                                                        "'Authorization: Bearer KEY' (the server's --api-key)"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                self.metrics.request(path, 401)
                return await response(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.request(path, message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def plan_request(model, req, kind: str, model_id: str = "dlm", batch_rows: int = 16) -> dict:
    """What the engine needs from a completion or chat request (`kind`: "completion" or "chat"): rows, suffix,
    gen_length, sampler, key, seed and seeds, prompt_tokens (an HTTPError 4xx where it is refused)."""
    if req.model is not None and req.model != model_id:
        raise HTTPError(404, f"this server serves the model '{model_id}', not '{req.model}' (GET /v1/models)",
                        "model")
    tok, process = model.tokenizer, model.process
    try:
        if kind == "chat":
            for i, m in enumerate(req.messages):
                check_text(f"messages[{i}].content", m.content)
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            rows, _ = given_rows(tok, process, None, None, None, messages)
            max_tokens = req.max_completion_tokens or req.max_tokens
            suffix = []
        else:
            texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
            for i, t in enumerate(texts):
                check_text("prompt", t)
            check_text("suffix", req.suffix)
            rows, _ = given_rows(tok, process, texts, None, None, None)
            suffix = tok(req.suffix, add_special_tokens=False)["input_ids"] if req.suffix else []
            max_tokens = req.max_tokens
    except ValueError as e:
        raise HTTPError(400, str(e), "messages" if kind == "chat" else "prompt") from None
    longest = max(len(r) for r in rows)
    room = model.context - longest - len(suffix)
    if max_tokens is None:
        max_tokens = min(64, room)
    if room < 1 or longest + max_tokens + len(suffix) > model.context:
        what = f"the prompt is {longest} tokens (BOS included)" + (f" and the suffix {len(suffix)}" if suffix else "")
        raise HTTPError(400, f"{what}; with max_tokens={max_tokens} that is {longest + max_tokens + len(suffix)} "
                             f"tokens, more than the model's context ({model.context}): shorten the prompt or "
                             "lower max_tokens", "max_tokens" if room >= 1 else "prompt")
    if len(rows) * req.n > batch_rows:
        raise HTTPError(400, f"{len(rows)} prompt(s) x n={req.n} is {len(rows) * req.n} rows, more than a batch "
                             f"holds ({batch_rows}, --batch-rows): ask for fewer", "n")
    try:
        sampler, blockwise = build_sampler(model, req, max_tokens)
    except ValueError as e:
        raise HTTPError(400, str(e), "sampler") from None
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    key = (type(sampler).__name__, repr(getattr(sampler, "config", None)),
           repr(getattr(sampler, "suppress_ids", None)),
           longest % sampler.block_length if blockwise else 0)
    return {"rows": [r for r in rows for _ in range(req.n)], "suffix": suffix, "gen_length": max_tokens,
            "sampler": sampler, "key": key, "seed": seed,
            "seeds": [sample_seed(seed, j) for _ in rows for j in range(req.n)], "prompt_tokens": longest}


def build_sampler(model, req, max_tokens: int):
    """The request's sampler (DiffusionLM._sampler: the same checks as `generate`); steps default to one per
    generated token where the sampler takes a step budget."""
    name = model.sampler_name(req.sampler)
    spec = sampler_spec(name)
    steps = req.steps
    if steps is None and "steps" in spec.options:
        steps = max_tokens
    options = req.sampler_options()
    if req.options:
        text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
        extra = model.sampler_options(req.sampler, [f"{k}={text(v)}" for k, v in req.options.items()])
        twice = sorted(set(extra) & (set(options) | {"steps", "temperature", "top_p", "block_length"}))
        if twice:
            raise ValueError(f"{', '.join(twice)} given twice (a field and options); give it once")
        options.update(extra)
    feedback = model.feedback_for(req.softmask, req.feedback)
    return model._sampler(req.sampler, steps, req.block_length, req.temperature, req.top_p, feedback, options)


async def parse(request: Request, cls, max_body: int):
    """The request body as `cls`: 413 past max_body bytes, 400 for bytes that are not UTF-8, malformed JSON, a
    body that is not an object, or fields that do not validate (each named)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise HTTPError(413, f"the body is {int(length)} bytes; the server takes at most {max_body} "
                             "(--max-body-mb)")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_body:
            raise HTTPError(413, f"the body is more than {max_body} bytes (--max-body-mb)")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPError(400, f"the body is not UTF-8 (byte {bytes(body)[e.start:e.start + 1]!r} at offset "
                             f"{e.start}): send JSON in UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise HTTPError(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        param = ".".join(str(x) for x in errors[0].get("loc", ())) if errors else None
        raise HTTPError(400, error_text(errors), param) from None


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def choice(kind: str, j: int, text: str, finish: str | None, extra: dict) -> dict:
    if kind.startswith("chat"):
        return {"index": j, "delta": {"content": text} if text or finish is None else {}, "finish_reason": finish,
                **{k: v for k, v in extra.items() if k != "text"}}
    return {"index": j, "text": text, "finish_reason": finish, "logprobs": None,
            **{k: v for k, v in extra.items() if k != "text"}}


def usage(results: list[dict], spec: dict) -> dict:
    prompt = spec["prompt_tokens"] * len(results)
    done = sum(r["tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "nfe": sum(r["nfe"] for r in results)}


def completion_body(head: dict, kind: str, results: list[dict], spec: dict) -> dict:
    if kind == "edit":  # OpenAI's legacy edit shape, with dlm's result (changes, nfe, rounds, ...) beside it
        r = results[0]
        return {**head, "object": "edit", "choices": [{"index": 0, "text": r["text"], "finish_reason": "stop"}],
                **{k: v for k, v in r.items() if k not in ("finish_reason", "tokens")}}
    if kind.startswith("chat"):
        choices = [{"index": j, "message": {"role": "assistant", "content": r["text"]},
                    "finish_reason": r["finish_reason"], "nfe": r["nfe"]} for j, r in enumerate(results)]
    else:
        choices = [{"index": j, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None,
                    "nfe": r["nfe"]} for j, r in enumerate(results)]
    return {**head, "object": kind, "choices": choices, "usage": usage(results, spec), "seed": spec["seed"]}
