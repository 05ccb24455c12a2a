"""The OpenAI wire format: request models (pydantic), what is refused, the error shape, response pieces.

Requests accept unknown fields (as OpenAI's clients send ``extra_body``) and ignore them, but a known
OpenAI (or vLLM) field that would change the output, sent with a value other than its default, is refused
with a 400 naming the field: silently dropping it would return something the client did not ask for.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..engine import SamplingParams


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # strict: "10" is not an int and 1 is not a bool (OpenAI refuses them too); unknown fields: kept, ignored
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = None


class _Common(_Request):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool | None = None  # vLLM extension: fixed output lengths for benchmarks
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Common):
    prompt: Any = None  # str | list[str] | list[int] | list[list[int]], checked by `completion_prompts`


class TextPart(_Request):
    type: str
    text: str | None = None


class Message(_Request):
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None


def _zero(v) -> bool:
    return v is None or v == 0


def _false(v) -> bool:
    return v is None or v is False


def _empty(v) -> bool:
    return v is None or v == {} or v == []


# field -> accepted values (the defaults): anything else changes the output in a way we cannot produce
COMMON_REFUSED = {
    "frequency_penalty": _zero, "presence_penalty": _zero, "logit_bias": _empty,
    "repetition_penalty": lambda v: v is None or v == 1, "min_p": _zero, "min_tokens": _zero,
    "use_beam_search": _false, "include_stop_str_in_output": _false, "prompt_logprobs": lambda v: v is None,
    "skip_special_tokens": lambda v: v is None or v is True, "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None, "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
}
COMPLETION_REFUSED = {
    **COMMON_REFUSED, "logprobs": lambda v: v is None, "echo": _false, "best_of": lambda v: v is None or v == 1,
    "suffix": lambda v: v is None or v == "",
}
CHAT_REFUSED = {
    **COMMON_REFUSED, "logprobs": _false, "top_logprobs": _zero, "tools": _empty, "functions": _empty,
    "tool_choice": lambda v: v is None or v == "none", "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"}, "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"], "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None, "web_search_options": lambda v: v is None,
    "continue_final_message": _false,
}


def parse_request(raw: bytes, model: type[_Request], refused: dict) -> _Request:
    """Validate a JSON body into `model`; bad JSON, a wrong type or a refused field -> APIError 400."""
    try:
        req = model.model_validate_json(raw or b"")
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}") from None
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "model_type" or not loc:
            raise APIError(400, "the body must be a JSON object") from None
        raise APIError(400, f"{loc}: {err['msg']}", param=loc) from None
    extra = req.model_extra or {}
    for name, accepted in refused.items():
        if name in extra and not accepted(extra[name]):
            raise APIError(400, f"{name}={json.dumps(extra[name])[:80]} is not supported by this server",
                           param=name, code="unsupported_parameter")
    return req


def sampling_params(req: _Common, *, max_tokens: int) -> SamplingParams:
    """The engine's SamplingParams of a request (max_tokens already resolved); bad values -> APIError 400."""
    n = 1 if req.n is None else req.n
    checks = [("n", n >= 1, "must be >= 1"), ("max_tokens", max_tokens >= 1, "must be >= 1")]
    if req.temperature is not None:
        checks.append(("temperature", math.isfinite(req.temperature) and req.temperature >= 0, "must be >= 0"))
    if req.top_p is not None:
        checks.append(("top_p", 0 < req.top_p <= 1, "must be in (0, 1]"))
    if req.top_k is not None:
        checks.append(("top_k", req.top_k >= -1, "must be -1 or 0 (off) or a positive int"))
    if req.seed is not None:
        checks.append(("seed", 0 <= req.seed < 2 ** 63, "must be in [0, 2**63)"))
    for name, ok, why in checks:
        if not ok:
            raise APIError(400, f"{name} {why}, got {getattr(req, name, max_tokens)!r}", param=name)
    try:
        return SamplingParams(n=n, temperature=1.0 if req.temperature is None else req.temperature,
                              top_k=-1 if req.top_k is None else req.top_k,
                              top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, max_tokens=max_tokens,
                              stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=bool(req.ignore_eos))
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e)) from None


def stop_strings(req: _Common) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """OpenAI's prompt forms -> token ids per prompt: "text", ["text", ...], [ids], [[ids], ...]."""
    def one(p, where):
        if isinstance(p, str):
            if not p:
                raise APIError(400, f"{where} is empty", param="prompt")
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
            return tokenizer.encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        if isinstance(p, list) and not p:
            raise APIError(400, f"{where} is empty", param="prompt")
        raise APIError(400, f"{where} must be a string or a list of token ids", param="prompt")

    if prompt is None:
        raise APIError(400, "prompt is required", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [one(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [one(prompt, "prompt")]


def chat_messages(messages: list[Message]) -> list[dict]:
    """Messages as the template's plain dicts; content parts joined (only text parts are supported)."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text"]
            if bad:
                raise APIError(400, f"messages[{i}].content: part type {bad[0]!r} is not supported (text only)",
                               param=f"messages[{i}].content")
            content = "".join(p.text or "" for p in content)
        out.append({**(m.model_extra or {}), "role": m.role, "content": content if content is not None else ""})
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data) -> str:
    """One server-sent event carrying `data` as JSON (or the literal [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


__all__ = ["APIError", "CompletionRequest", "ChatRequest", "parse_request", "sampling_params", "stop_strings",
           "completion_prompts", "chat_messages", "COMPLETION_REFUSED", "CHAT_REFUSED", "usage", "sse"]
