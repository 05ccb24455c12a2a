"""``LLM``: the offline engine front. Requests in, completions out (or streamed token by token)."""
from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from dataclasses import dataclass

import torch

from ..cache import BlockManager, PagedKVCache
from ..cache.kv_formats import bytes_per_token, kv_format, pool_blocks, residual_bytes
from .config import EngineConfig, ModelConfig, SamplingParams
from .model_runner import ModelRunner
from .models import load_model
from .sampler import make_generator, sample
from .scheduler import Scheduler, Sequence


@dataclass
class CompletionOutput:
    index: int
    token_ids: list
    text: str | None
    finish_reason: str | None  # "stop" (EOS or a stop token), "length" (max_tokens or max_model_len)
    logits: torch.Tensor | None = None  # (len(token_ids), vocab) float32 with SamplingParams(return_logits=True)
    time_to_first_token: float | None = None  # seconds from the request's arrival
    time_per_output_token: float | None = None  # seconds between tokens after the first
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: int
    prompt: object
    prompt_token_ids: list
    outputs: list  # CompletionOutput per completion (n of them); empty if rejected
    error: str | None = None  # why the request was rejected

    @property
    def finished(self) -> bool:
        return self.error is not None or all(o.finish_reason for o in self.outputs)


@dataclass
class StreamEvent:
    request_id: int
    index: int
    token_id: int
    text: str | None
    finish_reason: str | None


@dataclass
class _Request:
    prompt: object
    prompt_ids: list
    params: SamplingParams
    seqs: list


def _engine_config(config: EngineConfig | None, options: dict) -> EngineConfig:
    """The LLM's config: the one given, or one built from keyword options (the older spelling)."""
    if config is None:
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; the options are EngineConfig's "
                            f"fields: {', '.join(sorted(names))}")
        return EngineConfig(**options)
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
    if options:
        raise ValueError(f"engine options given twice: config=EngineConfig(...) and {', '.join(sorted(options))}; "
                         f"put them in the config (dataclasses.replace(config, ...))")
    return config


class LLM:
    """An offline serving engine over the paged KV cache.

    Args:
        model: a local Hugging Face folder, a GGUF file (``*.gguf``), a preset name
            (``memattn.engine.models.PRESETS``), a HF config dict, a ``ModelConfig`` (random weights), or a
            model built by ``memattn.engine.models``.
        config: an ``EngineConfig``: every engine option (pool, budgets, preemption, dtype, device, seed).
        tokenizer: anything with encode(str) -> ids and decode(ids) -> str; default: the folder's
            tokenizer.json, or bytes for random models.
        **options: instead of `config`, its fields as keywords (``LLM(path, num_kv_blocks=64)``), the rest
            at their defaults. Giving both is a ValueError; an unknown name a TypeError.
    """

    def __init__(self, model, config: EngineConfig | None = None, *, tokenizer=None, **options):
        self.config = c = _engine_config(config, options)
        if isinstance(model, torch.nn.Module):
            if not isinstance(getattr(model, "config", None), ModelConfig):
                raise TypeError("a model object must come from memattn.engine.models (its .config a ModelConfig)")
            self.model, self.model_config, tok = model.eval(), model.config, None
        else:
            self.model, self.model_config, tok = load_model(model, dtype=c.dtype, device=c.device, seed=c.seed)
        self.tokenizer = tokenizer if tokenizer is not None else tok
        mc = self.model_config
        dtype = next(self.model.parameters()).dtype
        fmt = kv_format(c.kv_cache_dtype)
        geometry = dict(num_layers=mc.num_layers, kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
                        block_size=c.block_size)
        per_block = round(bytes_per_token(fmt.name, dtype=dtype, **geometry) * c.block_size)
        # KIVI: one full-precision residual block per running sequence, taken from the same budget
        residual = c.max_num_seqs if fmt.kivi else None
        num_blocks = c.num_kv_blocks or pool_blocks(fmt.name, c.kv_cache_memory, residual_blocks=residual or 0,
                                                    dtype=dtype, **geometry)
        if num_blocks < 1:
            extra = residual_bytes(fmt.name, residual or 0, **geometry)
            raise ValueError(f"kv_cache_memory {c.kv_cache_memory} bytes holds no block ({per_block} bytes each"
                             + (f", after {extra} bytes of residual blocks)" if extra else ")"))
        self.max_model_len = min(mc.max_position_embeddings, c.max_model_len or mc.max_position_embeddings)
        self.streaming = policy = c.streaming_policy()
        if policy is not None:
            self.max_model_len = self._check_streaming(policy)
        self.blocks = BlockManager(num_blocks, c.block_size,
                                   enable_prefix_caching=c.enable_prefix_caching and policy is None)
        swap_blocks = c.swap_space // per_block if c.preemption == "swap" else 0
        self.cache = PagedKVCache(mc.num_layers, num_blocks, c.block_size, mc.num_kv_heads, mc.head_dim,
                                  dtype=dtype, device=c.device, kv_dtype=fmt.name, residual_blocks=residual,
                                  swap_blocks=swap_blocks)
        self.scheduler = Scheduler(self.config, self.blocks, self.cache)
        self.runner = ModelRunner(self.model, self.blocks, self.cache, c.device, streaming=policy)
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        # prefix cache, in prompt tokens of admitted sequences: looked up, and found computed (served metrics)
        self.prefix_queries = self.prefix_hits = 0

    def _check_streaming(self, policy) -> int:
        """StreamingLLM's requirements (``engine.streaming``); returns the length bound it leaves (none)."""
        mc = self.model_config
        if mc.arch != "llama":
            raise ValueError(f"streaming_window needs a rotary (llama) model; {mc.arch} has learned absolute "
                             "positions")
        if any(w is not None for w in mc.windows):
            raise ValueError("streaming_window on a model with a sliding window of its own is not supported")
        return sys.maxsize  # a streaming sequence is not bound by max_model_len

    # ---- requests ---------------------------------------------------------------------------------

    def _tokens(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this model has none (pass token ids)")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) or isinstance(prompt, torch.Tensor):
            ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        else:
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("empty prompt: a request needs at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room to generate: max_model_len is "
                             f"{self.max_model_len}")
        return ids

    def add_request(self, prompt, params: SamplingParams | dict | None = None) -> int:
        """Queue a request; raises ValueError/TypeError (and queues nothing) if it is invalid."""
        if params is None:
            params = SamplingParams()
        elif isinstance(params, dict):
            params = SamplingParams(**params)
        elif not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams or a dict, got {type(params).__name__}")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n = {params.n} completions exceed max_num_seqs = {self.config.max_num_seqs}")
        ids = self._tokens(prompt)
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        need = -(-longest // self.blocks.block_size)
        if self.streaming is None and need > self.blocks.num_blocks:  # (streaming: checked once, at start)
            raise ValueError(f"request may grow to {longest} tokens = {need} blocks, but the KV pool has only "
                             f"{self.blocks.num_blocks}; raise kv_cache_memory or lower max_tokens")
        rid = next(self._ids)
        seq = Sequence(self.scheduler.new_seq_id(), rid, 0, list(ids), len(ids), params, make_generator(params, 0))
        self._requests[rid] = _Request(prompt, list(ids), params, [seq])
        self.scheduler.add(seq)
        return rid

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- a step -----------------------------------------------------------------------------------

    def _stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.model_config.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def step(self) -> list[StreamEvent]:
        """Schedule, run the model once, sample; return the tokens produced.

        If it raises, call ``recover()`` before the next step (the step may have been half applied)."""
        waiting = set(self.scheduler.waiting)
        plan = self.scheduler.schedule()
        for seq, _ in plan.scheduled:
            if seq in waiting:  # admitted now: num_computed is what the prefix cache already held
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += seq.num_computed
        if not plan.scheduled:
            if self.scheduler.has_work():
                raise RuntimeError("the scheduler made no progress (KV pool too small for any waiting request)")
            return []
        logits = self.runner.run(plan)
        seqs, rows = [], []
        for r, (seq, *forks) in enumerate(self.scheduler.update(plan)):
            self._requests[seq.request_id].seqs += forks
            seqs += [seq, *forks]
            rows += [r] * (1 + len(forks))
        if rows != list(range(logits.shape[0])):  # forks (n > 1) repeat their row
            logits = logits[torch.tensor(rows, dtype=torch.int64)]
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        now = time.perf_counter()
        events = []
        for r, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.token_ids.append(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.params.return_logits:
                seq.logits.append(logits[r].clone())
            seq.finish_reason = self._stop(seq, tok)
            if seq.finished:
                seq.finish_time = now
                self.scheduler.finish(seq)
            text = self.tokenizer.decode([tok]) if self.tokenizer is not None else None
            events.append(StreamEvent(seq.request_id, seq.index, tok, text, seq.finish_reason))
        return events

    # ---- front ------------------------------------------------------------------------------------

    def _output(self, rid: int) -> RequestOutput:
        req = self._requests[rid]
        outs = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            ids = seq.output_ids
            ttft = tpot = None
            if seq.first_token_time is not None:
                ttft = seq.first_token_time - seq.arrival
                if seq.finish_time is not None and len(ids) > 1:
                    tpot = (seq.finish_time - seq.first_token_time) / (len(ids) - 1)
            text = self.tokenizer.decode(ids) if self.tokenizer is not None else None
            outs.append(CompletionOutput(seq.index, list(ids), text, seq.finish_reason,
                                         torch.stack(seq.logits) if seq.logits else None, ttft, tpot,
                                         seq.num_preemptions))
        return RequestOutput(rid, req.prompt, req.prompt_ids, outs)

    def _submit(self, prompts, sampling_params):
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        slots = []
        for prompt, p in zip(prompts, params):
            try:
                slots.append(self.add_request(prompt, p))
            except (ValueError, TypeError) as e:
                slots.append(RequestOutput(-1, prompt, [], [], error=f"{type(e).__name__}: {e}"))
        return slots

    def generate(self, prompts, sampling_params=None, *, progress=None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; one RequestOutput per prompt, in order.

        An invalid request (empty, too long, bad sampling values) comes back with ``error`` set and no
        completions; the others run. progress: optional callable(finished_requests, total) after each step.
        """
        slots = self._submit(prompts, sampling_params)
        pending = {s for s in slots if isinstance(s, int)}
        try:
            while pending:
                self.step()
                done = {rid for rid in pending if all(s.finished for s in self._requests[rid].seqs)}
                pending -= done
                if progress is not None:
                    progress(len(slots) - len(pending), len(slots))
            return [s if isinstance(s, RequestOutput) else self._output(s) for s in slots]
        finally:
            self._drop(slots)

    def stream(self, prompts, sampling_params=None):
        """Yield StreamEvents as tokens are sampled (rejected requests: one event with finish_reason "error")."""
        slots = self._submit(prompts, sampling_params)
        try:
            for i, s in enumerate(slots):
                if isinstance(s, RequestOutput):
                    yield StreamEvent(-1, 0, -1, s.error, "error")
            pending = {s for s in slots if isinstance(s, int)}
            while pending:
                for ev in self.step():
                    yield ev
                pending = {rid for rid in pending if not all(s.finished for s in self._requests[rid].seqs)}
        finally:
            self._drop(slots)

    def _drop(self, slots) -> None:
        """Forget the requests; abort any still running (their blocks are freed)."""
        for rid in (s for s in slots if isinstance(s, int)):
            req = self._requests.pop(rid, None)
            for seq in req.seqs if req else ():
                if not seq.finished:
                    self.scheduler.abort(seq)

    def abort(self, request_id: int, index: int | None = None) -> bool:
        """Stop a request added with ``add_request``; False if the engine does not know it.

        index None: every unfinished completion is aborted (finish_reason "abort"), its KV blocks freed at
        once, and the request forgotten (its outputs are gone; call it on a finished request to forget it).
        index i: only completion i is stopped (blocks freed), the request and its other completions go on;
        the caller sets the finish reason it wants to report (a stop string matched on text: "stop").
        Call it between steps, never from another thread during one.
        """
        req = self._requests.get(request_id)
        if req is None:
            return False
        for seq in req.seqs:
            if (index is None or seq.index == index) and not seq.finished:
                self.scheduler.abort(seq)
        if index is None:
            del self._requests[request_id]
        return True

    def recover(self) -> None:
        """After ``step()`` raised: drop all computed KV and put every unfinished sequence back in the
        waiting queue (as recompute preemption does), so no sequence continues from a half-applied step:
        the next steps re-prefill them from their tokens (prompt + sampled so far). Abort the culprit
        request first if it is known. Limitation: swap slots a failed plan was about to restore leak."""
        s = self.scheduler
        back = list(s.running) + list(s.swapped)
        for seq in s.running:
            if seq.seq_id in self.blocks:
                self.blocks.free(seq.seq_id)
        for seq in s.swapped:
            self.cache.release_swap(seq.swap_slots)
            seq.swap_slots = None
        for seq in back:
            seq.num_computed = 0
        s.running, s.swapped = [], type(s.swapped)()
        s.waiting.extendleft(reversed(back))

    def request_ids(self) -> list[int]:
        """Ids of the requests the engine holds (unfinished, or finished and not yet forgotten)."""
        return list(self._requests)

    def chat(self, messages, sampling_params=None, *, add_generation_prompt: bool = True,
             chat_template: str | None = None, progress=None, **template_kwargs) -> list[RequestOutput]:
        """``generate`` on conversations rendered by the tokenizer's chat template (``engine.chat``).

        messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations; one
        RequestOutput per conversation, in order, its ``prompt`` the rendered text. A model without a chat
        template raises ValueError; template_kwargs are more template variables.
        """
        from .chat import encode_rendered, is_conversation, render_chat

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this model has none")
        convs = [messages] if is_conversation(messages) else list(messages)
        texts = [render_chat(self.tokenizer, c, add_generation_prompt=add_generation_prompt,
                             chat_template=chat_template, **template_kwargs) for c in convs]
        outs = self.generate([encode_rendered(self.tokenizer, t) for t in texts], sampling_params, progress=progress)
        for out, text in zip(outs, texts):
            out.prompt = text
        return outs

    def stats(self):
        """The block pool's stats (``BlockStats``) plus preemptions so far."""
        return self.blocks.stats(), self.scheduler.num_preemptions


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "StreamEvent"]
