"""Chat templates: a conversation (a list of {"role", "content"} messages) -> the prompt text and token ids.

Renders a tokenizer's Jinja ``chat_template`` the way transformers' ``apply_chat_template`` does, so the
same conversation gives the same string and the same ids: a sandboxed immutable environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, ``{% generation %}`` blocks rendered
as plain text, a ``tojson`` filter that keeps non-ASCII text, and the globals ``raise_exception`` and
``strftime_now``. The variables are ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``
and any extra keyword (``tools``, ``documents``, ``enable_thinking``, ...).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime


def _messages(messages) -> list:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} must be a dict with a 'role' (and usually 'content'), got {m!r:.80}")
    return list(messages)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """The template, compiled once per distinct text (servers render the same template per request)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters and non-ASCII; templates expect plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render_chat(tokenizer, messages, *, add_generation_prompt: bool = True, chat_template: str | None = None,
                **template_kwargs) -> str:
    """The conversation as prompt text, by the tokenizer's chat template (or `chat_template`).

    messages: a list of dicts, each with "role" ("system", "user", "assistant", ...) and "content".
    add_generation_prompt: end with the header of an assistant turn, so the model writes the reply.
    template_kwargs: more template variables (they override bos_token/eos_token if given).
    Raises ValueError when there is no template, TypeError/ValueError for malformed messages, and
    jinja2's TemplateError when the template itself refuses the conversation (``raise_exception``).
    """
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                         "chat_template.jinja); pass chat_template=... or send a plain prompt instead")
    variables = dict(bos_token=getattr(tokenizer, "bos_token", None) or "",
                     eos_token=getattr(tokenizer, "eos_token", None) or "")
    variables.update(template_kwargs)
    return _compile(template).render(messages=_messages(messages), add_generation_prompt=add_generation_prompt,
                                     **variables)


def encode_chat(tokenizer, messages, **kwargs) -> list[int]:
    """Token ids of ``render_chat(tokenizer, messages, **kwargs)``.

    A template that writes the BOS token itself (the text starts with ``bos_token``) is encoded without
    special tokens, so the prompt never holds two BOS; otherwise the tokenizer adds its usual ones.
    """
    text = render_chat(tokenizer, messages, **kwargs)
    return encode_rendered(tokenizer, text)


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat prompt (see ``encode_chat`` for the BOS rule)."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def is_conversation(messages) -> bool:
    """True for one conversation (a list of message dicts), False for a list of conversations."""
    return isinstance(messages, (list, tuple)) and (not messages or isinstance(messages[0], dict))


__all__ = ["render_chat", "encode_chat", "encode_rendered", "is_conversation"]
