"""The OpenAI-compatible HTTP front (FastAPI): routes, the OpenAI reply shapes, streaming, and ``serve()``.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics.
Every request goes through the one ``EngineLoop``; a handler only parses, tokenises, submits and relays.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.chat import encode_rendered, render_chat
from .engine_loop import EngineLoop, Submission
from .metrics import CONTENT_TYPE_LATEST
from .protocol import (CHAT_REFUSED, COMPLETION_REFUSED, APIError, ChatRequest, CompletionRequest, chat_messages,
                       completion_prompts, new_id, now, parse_request, sampling_params, sse, stop_strings, usage)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _ClientGone(Exception):
    pass


class _Handler:
    """The state the routes share: the engine loop, the served model's name, the API key."""

    def __init__(self, engine: EngineLoop, model_name: str, api_key: str | None):
        self.engine, self.llm, self.model_name, self.api_key = engine, engine.llm, model_name, api_key
        self.created = now()
        # the longest sequence the pool can hold, so "to the end of the context" is a request it accepts
        self.context = min(self.llm.max_model_len, self.llm.blocks.num_blocks * self.llm.blocks.block_size)

    def auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    def check_model(self, name) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model `{name}` does not exist (this server holds `{self.model_name}`)",
                           param="model", code="model_not_found")

    def max_tokens(self, ids: list, requested, default, param: str) -> int:
        """The request's max_tokens: as given (refused if prompt + max_tokens exceeds the context), else
        `default` (None: to the end of the context, as the pool can hold it)."""
        room = self.context - len(ids)
        if len(ids) >= self.llm.max_model_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens, but this model's context is "
                                f"{self.llm.max_model_len} tokens (prompt and completion together)", param=param)
        if requested is None:
            return max(1, room if default is None else min(default, room))
        if requested >= 1 and len(ids) + requested > self.llm.max_model_len:
            raise APIError(400, f"this model's context is {self.llm.max_model_len} tokens, but {len(ids)} prompt "
                                f"tokens + max_tokens {requested} exceed it", param="max_tokens")
        return requested

    async def submit(self, prompts: list, req, *, requested, default, param: str):
        """Submit one Submission per prompt on one queue; wait until the engine admitted all of them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stops = stop_strings(req)
        subs = []
        for tag, ids in enumerate(prompts):
            params = sampling_params(req, max_tokens=self.max_tokens(ids, requested, default, param))
            subs.append(Submission(ids, params, stops, queue, loop, tag))
        for sub in subs:
            self.engine.submit(sub)
        errors = [e for e in await asyncio.gather(*(s.admission for s in subs)) if e is not None]
        if errors:
            for sub in subs:
                self.engine.abort(sub)
            raise errors[0]
        return subs, queue

    async def messages(self, request: Request, subs, queue, *, watch: bool):
        """The submissions' messages until every prompt is done; aborts them all if this ends early.

        watch: also notice a client that left while waiting (non-streaming replies; a stream notices by
        its send failing, which cancels this generator)."""
        pending = len(subs)
        try:
            while pending:
                try:
                    msg = await (asyncio.wait_for(queue.get(), 0.5) if watch else queue.get())
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise _ClientGone() from None
                    continue
                if msg[0] == "error":
                    raise msg[2]
                if msg[0] == "done":
                    pending -= 1
                yield msg
        finally:
            for sub in subs:
                self.engine.abort(sub)  # no-op for the finished ones: frees the blocks of the others now

    async def collect(self, request: Request, subs, queue, n: int):
        """(texts, token ids, finish reasons: each by choice index; prompt tokens, completion tokens)."""
        texts, ids, reasons, prompt_tokens, completion_tokens = {}, {}, {}, 0, 0
        async for msg in self.messages(request, subs, queue, watch=True):
            if msg[0] == "delta":
                _, tag, index, text, token_ids, reason = msg
                texts.setdefault(tag * n + index, []).append(text)
                ids.setdefault(tag * n + index, []).extend(token_ids)
                if reason:
                    reasons[tag * n + index] = reason
            else:
                prompt_tokens, completion_tokens = prompt_tokens + msg[2], completion_tokens + msg[3]
        return {i: "".join(t) for i, t in texts.items()}, ids, reasons, prompt_tokens, completion_tokens

    async def stream(self, request: Request, subs, queue, n: int, chunk, include_usage: bool, first=None):
        """Server-sent events: `first` chunks, then chunk(choice index, text, finish_reason, ids) per delta,
        then the usage chunk (when asked for) and [DONE]. An error mid-stream is sent as an error event."""
        prompt_tokens = completion_tokens = 0
        try:
            for c in first or ():
                yield sse(c)
            async for msg in self.messages(request, subs, queue, watch=False):
                if msg[0] == "delta":
                    _, tag, index, text, token_ids, reason = msg
                    yield sse(chunk(tag * n + index, text, reason, token_ids))
                else:
                    prompt_tokens, completion_tokens = prompt_tokens + msg[2], completion_tokens + msg[3]
            if include_usage:
                yield sse({**chunk(None, None, None, None), "choices": [],
                           "usage": usage(prompt_tokens, completion_tokens)})
        except APIError as e:
            yield sse(e.body())
        yield sse("[DONE]")


def _n(req) -> int:
    return 1 if req.n is None else req.n


def _ids(req, token_ids) -> dict:
    """vLLM's ``return_token_ids`` extension: the sampled ids beside the text (the whole completion's in a
    reply, the delta's in a chunk)."""
    return {"token_ids": list(token_ids or [])} if (req.model_extra or {}).get("return_token_ids") is True else {}


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def build_app(engine: EngineLoop, *, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over a started (or to be started) ``EngineLoop``; its shutdown stops the loop."""
    h = _Handler(engine, model_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.join(timeout=10)  # uvicorn's shutdown (after the streams ended): let the engine thread finish

    app = FastAPI(title="memattn", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.handler = h

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):  # FastAPI's 422, in OpenAI's shape and status
        return JSONResponse(APIError(400, str(e.errors()[:1])).body(), status_code=400)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card():
        return {"id": model_name, "object": "model", "created": h.created, "owned_by": "memattn",
                "max_model_len": h.llm.max_model_len}

    @app.get("/v1/models")
    async def models(request: Request):
        h.auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        h.auth(request)
        h.check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        h.auth(request)
        req = parse_request(await request.body(), CompletionRequest, COMPLETION_REFUSED)
        h.check_model(req.model)
        prompts = completion_prompts(req.prompt, h.llm.tokenizer)
        subs, queue = await h.submit(prompts, req, requested=req.max_tokens, default=COMPLETION_DEFAULT_MAX_TOKENS,
                                     param="prompt")
        rid, created, n = new_id("cmpl"), now(), _n(req)

        def body(choices, **more):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, **more}

        if req.stream:
            extra = {"usage": None} if _include_usage(req) else {}

            def chunk(i, text, reason, token_ids):
                return body([{"index": i, "text": text, "logprobs": None, "finish_reason": reason,
                              **_ids(req, token_ids)}], **extra)
            return StreamingResponse(h.stream(request, subs, queue, n, chunk, _include_usage(req)),
                                     media_type="text/event-stream")
        try:
            texts, ids, reasons, pt, ct = await h.collect(request, subs, queue, n)
        except _ClientGone:
            return Response(status_code=499)
        choices = [{"index": i, "text": texts.get(i, ""), "logprobs": None, "finish_reason": reasons.get(i),
                    **_ids(req, ids.get(i, []))} for i in range(len(prompts) * n)]
        return body(choices, usage=usage(pt, ct))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        h.auth(request)
        req = parse_request(await request.body(), ChatRequest, CHAT_REFUSED)
        h.check_model(req.model)
        messages = chat_messages(req.messages)
        tok = h.llm.tokenizer
        kwargs = (req.model_extra or {}).get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise APIError(400, "chat_template_kwargs must be an object", param="chat_template_kwargs")
        try:
            text = render_chat(tok, messages, add_generation_prompt=True, **kwargs)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 - jinja2's TemplateError: the template refused the conversation
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        ids = encode_rendered(tok, text)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        subs, queue = await h.submit([ids], req, requested=requested, default=None, param="messages")
        rid, created, n = new_id("chatcmpl"), now(), _n(req)

        def body(choices, **more):
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "system_fingerprint": None, "choices": choices, **more}

        if req.stream:
            extra = {"usage": None} if _include_usage(req) else {}

            def chunk(i, text, reason, token_ids, delta=None):
                return {**body([{"index": i, "delta": delta if delta is not None else
                                 ({"content": text} if text else {}), "logprobs": None, "finish_reason": reason,
                                 **_ids(req, token_ids)}], **extra), "object": "chat.completion.chunk"}
            first = [chunk(i, None, None, None, {"role": "assistant", "content": ""}) for i in range(n)]
            return StreamingResponse(h.stream(request, subs, queue, n, chunk, _include_usage(req), first),
                                     media_type="text/event-stream")
        try:
            texts, ids, reasons, pt, ct = await h.collect(request, subs, queue, n)
        except _ClientGone:
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts.get(i, "")}, "logprobs": None,
                    "finish_reason": reasons.get(i), **_ids(req, ids.get(i, []))} for i in range(n)]
        return body(choices, usage=usage(pt, ct))

    return app


def serve(llm, *, host: str = "127.0.0.1", port: int = 8000, model_name: str, api_key: str | None = None,
          log_level: str = "info") -> None:
    """Serve `llm` over HTTP until SIGINT/SIGTERM. On the signal the engine loop ends every open request
    with an error (so streams close and uvicorn's graceful shutdown does not wait on them), then exits."""
    import uvicorn

    engine = EngineLoop(llm)
    app = build_app(engine, model_name=model_name, api_key=api_key)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.request_stop()  # only sets a flag: safe inside a signal handler
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="on")
    engine.start()
    try:
        Server(config).run()
    finally:
        engine.join(timeout=10)


__all__ = ["build_app", "serve"]
