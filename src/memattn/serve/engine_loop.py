"""One engine loop for all HTTP requests: a background thread owns the ``LLM`` and is the only one to touch it.

The event loop (uvicorn's) hands work over through ``submit`` / ``abort`` (a lock-protected inbox); the
thread adds requests, steps the engine (so every request in flight shares each forward pass: continuous
batching), detokenises each completion incrementally, matches stop strings on the text, and posts
messages back onto the request's own asyncio queue with ``loop.call_soon_threadsafe``. Messages:

    ("delta", tag, index, text, ids, reason)  new text of completion `index` of prompt `tag` and the token
                                        ids sampled since its last delta; reason: None while it runs, else
                                        "stop" / "length" (its last message)
    ("done", tag, prompt_tokens, completion_tokens)   every completion of the prompt finished
    ("error", tag, APIError)            the request failed (engine error, shutdown): its last message

Admission is answered apart, on ``Submission.admission`` (a future: None, or the APIError that rejected
it), so the HTTP reply can still be a 400 before a stream starts.

One bad request never takes the loop down: a rejected request gets a 400, an exception in a step fails the
requests admitted since the last good step (the batch ran fine before them; if none, every request in
flight, since the failure cannot be pinned), frees their blocks, and the loop goes on.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..engine.detokenize import IncrementalDetokenizer, StopStrings
from .metrics import ServerMetrics
from .protocol import APIError

log = logging.getLogger("memattn.serve")


@dataclass
class _Completion:
    """What the loop keeps per completion of a request."""

    detok: IncrementalDetokenizer
    stops: StopStrings
    num_tokens: int = 0
    done: bool = False
    new_ids: list = field(default_factory=list)  # sampled since the last delta


@dataclass(eq=False)
class Submission:
    """One prompt of an HTTP request, as handed to the engine thread.

    prompt_ids: the prompt's token ids; params: SamplingParams; stops: stop strings; tag: the prompt's
    position in its HTTP request (a batch of prompts shares one queue); queue/loop: where messages go.
    """

    prompt_ids: list
    params: object
    stops: list
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    tag: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    rid: int | None = None  # the engine's request id, once admitted
    closed: bool = False  # its last message was posted (or the client left): nothing more is sent
    first_token: bool = False
    completions: dict = field(default_factory=dict)
    admission: asyncio.Future | None = None  # made by __post_init__ on `loop`

    def __post_init__(self):
        self.admission = self.loop.create_future()

    def post(self, *message) -> None:
        if not self.closed:
            self._call(self.queue.put_nowait, message)

    def admit(self, error: APIError | None) -> None:
        """Answer the admission future (from any thread); an error closes the submission."""
        if error is not None:
            self.closed = True
        self._call(_resolve, self.admission, error)

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            self.closed = True


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


class EngineLoop:
    """The thread that owns `llm`. ``start()`` it once; ``request_stop()`` (signal-safe) ends it: every
    request still open gets an error message and later submissions are refused with a 503."""

    def __init__(self, llm, metrics: ServerMetrics | None = None, *, idle_wait: float = 0.05):
        self.llm = llm
        self.metrics = metrics or ServerMetrics()
        self.idle_wait = idle_wait  # how often an idle loop looks at the stop flag
        self.stopping = False  # a plain attribute: set from a signal handler, where taking a lock could deadlock
        self._cv = threading.Condition()
        self._inbox: list[Submission] = []
        self._aborts: list[Submission] = []
        self._active: dict[int, Submission] = {}
        self._fresh: set[int] = set()  # admitted since the last successful step: the suspects of a failure
        self._thread = threading.Thread(target=self._run, name="memattn-engine", daemon=True)
        self.update_metrics()

    # ---- called from the event loop ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.stopping

    def submit(self, sub: Submission) -> None:
        """Queue a prompt; refused (an error message) once the loop is stopping."""
        with self._cv:  # checked under the lock: the loop's last look at the inbox comes after `stopping`
            if not (self.stopping or not self._thread.is_alive()):
                self._inbox.append(sub)
                self._cv.notify()
                return
        sub.admit(APIError(503, "the server is shutting down"))

    def abort(self, sub: Submission) -> None:
        """The client is gone: stop the request and free its blocks now (no further messages)."""
        if sub.closed:
            return
        sub.closed = True
        with self._cv:
            self._aborts.append(sub)
            self._cv.notify()

    def request_stop(self) -> None:
        self.stopping = True

    def join(self, timeout: float | None = None) -> None:
        self.stopping = True
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug of the loop itself: say so to every open request, never hang them
            log.critical("the engine loop died: %s", "".join(traceback.format_exception(e)))
            self.stopping = True
            self._close_all([], APIError(500, f"the engine loop died: {type(e).__name__}: {e}"))

    def _serve(self) -> None:
        llm = self.llm
        while True:
            with self._cv:
                while not (self._inbox or self._aborts or llm.has_unfinished() or self.stopping):
                    self._cv.wait(self.idle_wait)
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            if self.stopping:
                self._close_all(inbox)
                return
            for sub in inbox:
                self._admit(sub)
            for sub in aborts:
                self._forget(sub)
            if llm.has_unfinished():
                try:
                    events = llm.step()
                except Exception as e:  # noqa: BLE001 - the loop must outlive any request
                    self._step_failed(e)
                else:
                    self._fresh.clear()
                    self._dispatch(events)
            self.update_metrics()

    def _admit(self, sub: Submission) -> None:
        try:
            sub.rid = self.llm.add_request(sub.prompt_ids, sub.params)
        except (TypeError, ValueError) as e:
            sub.admit(APIError(400, str(e)))
            return
        tok = self.llm.tokenizer
        for i in range(sub.params.n):
            sub.completions[i] = _Completion(IncrementalDetokenizer(tok, sub.prompt_ids), StopStrings(sub.stops))
        self._active[sub.rid] = sub
        self._fresh.add(sub.rid)
        sub.admit(None)

    def _forget(self, sub: Submission) -> None:
        """Drop a request from the engine (blocks freed) and from the loop's books."""
        if sub.rid is not None:
            self.llm.abort(sub.rid)
            self._active.pop(sub.rid, None)
            self._fresh.discard(sub.rid)

    def _fail(self, sub: Submission, error: APIError) -> None:
        sub.post("error", sub.tag, error)
        sub.closed = True
        self._forget(sub)

    def _step_failed(self, e: Exception) -> None:
        log.error("engine step failed: %s", "".join(traceback.format_exception(e)))
        suspects = [self._active[r] for r in self._fresh if r in self._active] or list(self._active.values())
        for sub in suspects:
            self._fail(sub, APIError(500, f"the engine failed on this request: {type(e).__name__}: {e}"))
        self.llm.recover()  # the others restart from their tokens so far (their KV may be half written)
        self._fresh.clear()

    def _dispatch(self, events) -> None:
        for ev in events:
            sub = self._active.get(ev.request_id)
            if sub is None or sub.closed:
                continue
            try:
                self._token(sub, ev)
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer failing on this request's text
                log.error("request %s failed: %s", sub.rid, "".join(traceback.format_exception(e)))
                self._fail(sub, APIError(500, f"failed to produce text: {type(e).__name__}: {e}"))

    def _token(self, sub: Submission, ev) -> None:
        comp = sub.completions[ev.index]
        if comp.done:
            return
        comp.num_tokens += 1
        comp.new_ids.append(ev.token_id)
        self.metrics.generated_tokens.inc()
        if not sub.first_token:
            sub.first_token = True
            self.metrics.time_to_first_token.observe(time.perf_counter() - sub.arrival)
        reason = ev.finish_reason
        # an EOS or stop token ends the text without showing itself (OpenAI: the stop sequence is not returned)
        text = "" if reason == "stop" else comp.detok.push(ev.token_id)
        text, stopped = comp.stops.push(text)
        if stopped:
            if reason is None:
                self.llm.abort(sub.rid, ev.index)  # its blocks come back now, not at max_tokens
            reason = "stop"
        elif reason is not None:
            tail, stopped = comp.stops.push(comp.detok.flush())
            text += tail if stopped else tail + comp.stops.flush()
            reason = "stop" if stopped else reason
        if text or reason:
            sub.post("delta", sub.tag, ev.index, text, comp.new_ids, reason)
            comp.new_ids = []
        if reason:
            comp.done = True
            self.metrics.finished_requests.labels(reason).inc()
            if all(c.done for c in sub.completions.values()):
                sub.post("done", sub.tag, len(sub.prompt_ids), sum(c.num_tokens for c in sub.completions.values()))
                sub.closed = True
                self._forget(sub)

    def _close_all(self, inbox, error: APIError | None = None) -> None:
        """`stopping` is set: fail every open request and everything still in the inbox (taken again under
        the lock, after which no submission can enter)."""
        error = error or APIError(503, "the server is shutting down")
        with self._cv:
            inbox, self._inbox = inbox + self._inbox, []
        for sub in list(self._active.values()):
            self._fail(sub, error)
        for sub in inbox:  # never admitted
            sub.admit(error)
        with contextlib.suppress(Exception):
            self.update_metrics()

    def update_metrics(self) -> None:
        """Refresh the gauges from the engine (engine thread only, or before it starts)."""
        s = self.llm.scheduler
        running = {seq.request_id for seq in list(s.running) + list(s.swapped)}
        waiting = {seq.request_id for seq in s.waiting} - running
        blocks = self.llm.blocks
        free = blocks.num_free_blocks
        self.metrics.set_state(running=len(running), waiting=len(waiting) + len(self._inbox),
                               blocks_used=blocks.num_blocks - free, blocks_free=free,
                               prefix_queries=self.llm.prefix_queries, prefix_hits=self.llm.prefix_hits)


__all__ = ["EngineLoop", "Submission"]
