"""Incremental detokenisation and stop strings, for text that is streamed as tokens come.

Two small pure pieces (no engine, no server), chained per completion:

    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    stops = StopStrings(["\\n\\n", "User:"])
    for token in tokens:
        text, stopped = stops.push(detok.push(token))   # text: safe to show now
        if stopped: break
    else:
        text = stops.push(detok.flush())[0] + stops.flush()  # the end: whatever was held back

Decoding one token at a time is wrong twice over: a multi-byte UTF-8 character (emoji, CJK) may be split
across byte-level tokens, each half decoding to U+FFFD, and SentencePiece-style tokenizers drop the leading
space of a token decoded alone. ``IncrementalDetokenizer`` uses the prefix-offset / read-offset scheme of
TGI and vLLM: decode a short window of context tokens, then the window plus the new ones, and emit the
difference, holding it back while it still ends in U+FFFD (an incomplete character).

``StopStrings`` matches stop strings on the text (so a stop string may span tokens), holds back a tail that
could be the start of a stop string until the next text decides, and never returns the stop string itself
(OpenAI's semantics).
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded in front of the first output token (leading spaces, merges)


class IncrementalDetokenizer:
    """Turns token ids, pushed one at a time, into text deltas whose concatenation is the decoded text.

    tokenizer: anything with ``decode(ids, skip_special_tokens=...)``. prompt_ids: the prompt, of which
    the last few tokens are decoded as context only (never emitted). skip_special_tokens: as ``decode``'s.

    Invariant: ``"".join(deltas) + flush()`` equals ``decode(output_ids)`` whenever decoding is
    prefix-stable (decode(a + b) starts with decode(a)), which holds for byte-level BPE and SentencePiece
    tokenizers away from the prompt boundary. A delta never ends inside a multi-byte character.
    """

    def __init__(self, tokenizer, prompt_ids=(), *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids)[-CONTEXT_TOKENS:]
        self.ids: list[int] = context
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already emitted (or context)
        self.read_offset = len(context)  # ids from here on have not been emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is now certain ("" while it is held back)."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """The end of the completion: return whatever is still held back (possibly with U+FFFD in it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        # hold back while the tail is an incomplete character, or decoding produced nothing new (a special
        # token skipped, a byte that starts a character); `final` gives up waiting
        if not final and (len(full) <= len(prefix) or full.endswith(REPLACEMENT)):
            return ""
        delta = full[len(prefix):]  # as vLLM: assumes decoding is prefix-stable over the short window
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


class StopStrings:
    """Finds the first stop string in streamed text; text that may begin one is held back until decided.

    stops: the stop strings (empty strings are ignored). ``push(text)`` returns ``(safe_text, stopped)``:
    safe_text can be shown now; stopped is True once a stop string has appeared, and safe_text then ends
    just before it (the stop string and everything after it are dropped). After a stop, push returns
    ("", True). ``flush()`` returns the held-back tail at the end of a completion that did not stop.
    """

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        text = self.pending + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)], True
        # the longest tail of `text` that is a proper prefix of some stop string must wait: the next text
        # may complete it (earlier text cannot be the start of a stop: it would have been held or found)
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self.pending = text[len(text) - hold:]
        return text[:len(text) - hold], False

    def flush(self) -> str:
        """The held-back tail (no stop string came); "" after a stop."""
        out, self.pending = self.pending, ""
        return out


__all__ = ["IncrementalDetokenizer", "StopStrings"]
