"""The ``memattn`` command line. ``memattn compare`` is the main job."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _positive(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _print_table(header, rows, title=None):
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        if title:
            print(title)
        for row in [header] + rows:
            print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
        return
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


class _Progress:
    """A progress bar (rich if installed, else one line per step on stderr)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        try:
            from rich.progress import Progress
            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(label, total=total)
        except ImportError:
            self.bar = None

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def step(self, text: str):
        self.done += 1
        if self.bar:
            self.bar.update(self.task, advance=1, description=f"{self.label}: {text}")
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)


def cmd_compare(args) -> int:
    from . import compare

    methods = args.methods.split(",") if args.methods else list(compare.METHODS)
    unknown = [m for m in methods if m not in compare.METHODS]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(compare.METHODS)}",
              file=sys.stderr)
        return 2
    total = len(methods) * len(args.seq_lens)
    with _Progress(total, "measuring") as bar:
        records = compare.run_compare(
            args.seq_lens, batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=DTYPES[args.dtype],
            backward=args.backward, layers=args.layers, methods=methods, repeats=args.repeats,
            progress=lambda r: bar.step(f"{r.method} S={r.seq_len} {r.status}"))
    what = f"forward + backward through {args.layers} layers" if args.backward else "forward, one layer"
    title = (f"memattn compare: B={args.batch} H={args.heads} D={args.head_dim} {args.dtype}, {what} "
             f"({torch.get_num_threads()} threads)")
    _print_table(compare.TABLE_HEADER, compare.table_rows(records), title)
    print(f"peak = measured peak bytes allocated during the call (torch profiler memory events); "
          f"max err = vs float64 reference on {compare.ERR_ROWS * 2} query rows "
          f"(window: same window; linear: vs softmax attention)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(compare.records_as_dicts(records), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            compare.plot(records, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("matplotlib is not installed: pip install 'memattn[cli]' for --plot", file=sys.stderr)
            return 1
    return 0


def cmd_compare_kv(args) -> int:
    from . import compare_kv
    from .engine.models import PRESETS, config_from_hf, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = tok = None
    if args.model:
        try:
            model, cfg, tok = load_model(args.model)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        what = os.path.basename(os.path.normpath(args.model))
    else:
        if args.preset not in PRESETS:
            print(f"error: unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}", file=sys.stderr)
            return 2
        cfg, what = config_from_hf(PRESETS[args.preset]), f"preset {args.preset} (random)"
    geometry = compare_kv.Geometry.of(cfg)
    try:
        ppl = None
        if model is not None:
            print(f"quality: perplexity on {args.eval_tokens} tokens of pydoc_data.topics, 64-token chunks",
                  file=sys.stderr)
            ppl = compare_kv.quality(model, tok, args.eval_tokens, args.sinks, args.window)
        names = compare_kv.row_names(args.sinks, args.window)
        with _Progress(len(names) * len(args.context), "measuring") as bar:
            records = compare_kv.run_compare_kv(
                args.context, geometry, batch=args.batch, sinks=args.sinks, window=args.window,
                repeats=args.repeats, ppl=ppl, progress=lambda r: bar.step(f"{r.row} N={r.context}"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = geometry
    title = (f"memattn compare-kv: {what}, {g.num_layers} layers, {g.heads} q heads, {g.kv_heads} kv heads, "
             f"D={g.head_dim}, batch {args.batch}, block {compare_kv.BLOCK} ({torch.get_num_threads()} threads)")
    _print_table(compare_kv.TABLE_HEADER, compare_kv.table_rows(records), title)
    print("bytes/token: all layers, keys + values, scales included, per token of one sequence (bounded rows: "
          "their bytes at N / N; KIVI's one full-precision residual block per sequence is in the peak, not here); "
          "peak = measured while allocating and filling the cache (torch profiler memory events); "
          "decode = one step of attention through every layer (paged: memattn.paged_attention; "
          "window: over the kept blocks); ppl change vs the full-width cache")
    if ppl is not None and args.sinks + args.window >= args.eval_tokens:
        print(f"the window row evicts nothing within the {args.eval_tokens} evaluated tokens, so its ppl change "
              f"is that of the full-width cache; --eval-tokens above {args.sinks + args.window} shows its cost")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(compare_kv.records_as_dicts(records), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            compare_kv.plot(records, args.plot, title.split(" (")[0])
            print(f"wrote {args.plot}")
        except ImportError:
            print("matplotlib is not installed: pip install 'memattn[cli]' for --plot", file=sys.stderr)
            return 1
    return 0


FAVOR_FEATURES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def _compare_or_favor_alias(args) -> int:
    """`compare --favor-sweep` (deprecated) runs the favor-sweep subcommand; plain `compare` the table."""
    if not args.favor_sweep:
        return cmd_compare(args)
    print("memattn: `compare --favor-sweep` is deprecated; use `memattn favor-sweep`", file=sys.stderr)
    seq_len = args.seq_lens[0] if args.seq_lens != DEFAULT_SEQ_LENS else 256
    return cmd_favor_sweep(argparse.Namespace(seq_len=seq_len, head_dim=args.head_dim, features=FAVOR_FEATURES,
                                              plot=args.plot or "favor_sweep.png"))


def cmd_favor_sweep(args) -> int:
    from .ops.linear import favor_sweep

    counts, seq_len = args.features, args.seq_len
    with _Progress(1, "FAVOR+ sweep") as bar:
        rows = favor_sweep(seq_len, args.head_dim, counts, seed=0)
        bar.step("done")
    _print_table(["random features", "relative error vs softmax"], [[str(m), f"{e:.4f}"] for m, e in rows],
                 f"FAVOR+ error against exact softmax attention (S={seq_len}, D={args.head_dim}, mean of 4 draws)")
    path = args.plot
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install 'memattn[cli]' for the plot", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog([m for m, _ in rows], [e for _, e in rows], marker="o", label="FAVOR+ (measured)")
    ref = rows[0][1] * (rows[0][0] ** 0.5)
    ax.loglog([m for m, _ in rows], [ref / m ** 0.5 for m, _ in rows], "--", color="gray", label="1/sqrt(m)")
    ax.set_xlabel("random features m")
    ax.set_ylabel("relative error vs softmax")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return 0


def cmd_masks_show(args) -> int:
    from . import mask_spec

    try:
        mask = mask_spec.parse(args.spec)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    block = args.block or getattr(mask, "preferred_block", None) or max(1, -(-args.seq_len // 48))
    kinds = mask_spec.layout(mask, args.seq_len, block)
    print(f"{mask!r}: S={args.seq_len}, tiles of {block} -> {kinds.shape[0]} x {kinds.shape[1]}")
    print(mask_spec.render_text(kinds))
    if args.png:
        mask_spec.render_png(kinds, args.png, f"{mask!r}, S={args.seq_len}, block {block}")
        print(f"wrote {args.png}")
    return 0


DEFAULT_SEQ_LENS = [1024, 2048, 4096, 8192]

def _sampling(args, **more):
    from .engine import SamplingParams

    return SamplingParams(**{**dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed, max_tokens=args.max_tokens), **more})


def cmd_generate(args) -> int:
    from .engine import LLM
    from .engine.args import engine_config_from_args

    llm = LLM(args.model or args.random, engine_config_from_args(args))
    prompt = args.prompt
    if args.chat:
        from .engine.chat import encode_chat

        try:
            prompt = encode_chat(llm.tokenizer, [{"role": "user", "content": args.prompt}])
        except (ValueError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    out = llm.generate([prompt], _sampling(args))[0]
    if out.error:
        print(f"error: {out.error}", file=sys.stderr)
        return 2
    c = out.outputs[0]
    print(c.text if c.text is not None else c.token_ids)
    print(f"[{len(c.token_ids)} tokens, finish: {c.finish_reason}, TTFT {c.time_to_first_token * 1e3:.1f} ms, "
          f"{(c.time_per_output_token or 0) * 1e3:.1f} ms/token]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """An interactive chat in the terminal: one user turn per stdin line, the reply streamed as it comes;
    the history is kept (``/reset`` clears it), ``/exit`` or end of input ends."""
    from .engine import LLM
    from .engine.args import engine_config_from_args
    from .engine.chat import encode_chat
    from .engine.detokenize import IncrementalDetokenizer

    llm = LLM(args.model, engine_config_from_args(args))
    if not getattr(llm.tokenizer, "chat_template", None):
        print(f"error: {args.model} has no chat template", file=sys.stderr)
        return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history = list(system)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = encode_chat(llm.tokenizer, history)
        room = llm.max_model_len - len(ids)
        if room < 1:
            print("error: the conversation fills the context; /reset to start again", file=sys.stderr)
            history.pop()
            continue
        detok, reply = IncrementalDetokenizer(llm.tokenizer, ids), []
        for ev in llm.stream([ids], _sampling(args, max_tokens=min(args.max_tokens, room))):
            if ev.finish_reason == "error":
                print(f"error: {ev.text}", file=sys.stderr)
                break
            # the EOS that ends the turn is not part of the reply
            text = detok.push(ev.token_id) if ev.finish_reason != "stop" else ""
            text += detok.flush() if ev.finish_reason else ""
            reply.append(text)
            print(text, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_serve(args) -> int:
    from .engine import LLM
    from .engine.args import engine_config_from_args

    try:
        from .serve import serve
    except ImportError as e:
        print(f"error: {e}; pip install 'memattn[serve]'", file=sys.stderr)
        return 1
    llm = LLM(args.model, engine_config_from_args(args))
    name = args.served_model_name or args.model
    print(f"memattn serve: {name} on http://{args.host}:{args.port}/v1 ({llm.blocks.num_blocks} KV blocks of "
          f"{llm.blocks.block_size} tokens, max_model_len {llm.max_model_len})", file=sys.stderr, flush=True)
    serve(llm, host=args.host, port=args.port, model_name=name, api_key=args.api_key, log_level=args.log_level)
    return 0


def _add_sampling_args(p, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=_positive, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def cmd_bench_serve(args) -> int:
    from .engine import LLM
    from .engine.args import engine_config_from_args
    from .engine.workload import make_requests, run_engine

    llm = LLM(args.model or "llama-30m", engine_config_from_args(args))
    reqs = make_requests(args.num_requests, seed=args.seed, prompt_lens=(16, args.max_prompt),
                         output_lens=(16, args.max_output), vocab=llm.model_config.vocab_size)
    with _Progress(args.num_requests, "requests") as bar:
        seen = [0]

        def progress(done, total):
            while seen[0] < done:
                seen[0] += 1
                bar.step(f"{done}/{total} done")
        r = run_engine(llm, reqs, progress=progress)
    stats, preemptions = llm.stats()
    rows = [[k, v] for k, v in (("requests", str(len(reqs))), ("output tokens", str(r["out_tokens"])),
                                ("wall s", f"{r['wall_s']:.2f}"),
                                ("output tokens/s", f"{r['out_tokens'] / r['wall_s']:.1f}"),
                                ("mean TTFT s", f"{r['mean_ttft_s']:.3f}"), ("preemptions", str(preemptions)),
                                ("KV blocks", str(stats.num_blocks)))]
    _print_table(["metric", "value"], rows, "memattn bench-serve (use benchmarks/serve.py for the HF baseline)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .engine.args import add_engine_args

    p = argparse.ArgumentParser(prog="memattn", description="Memory-efficient attention: measure and run.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="the memory table (standard / checkpoint / blockwise / window / linear), "
                                       "measured on this machine")
    c.add_argument("--seq-lens", type=_int_list, default=DEFAULT_SEQ_LENS)
    c.add_argument("--batch", type=_positive, default=1)
    c.add_argument("--heads", type=_positive, default=8)
    c.add_argument("--head-dim", type=_positive, default=64)
    c.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    c.add_argument("--backward", action="store_true",
                   help="measure a stack of --layers calls plus one backward pass through all of them")
    c.add_argument("--layers", type=_positive, default=4)
    c.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    c.add_argument("--repeats", type=_positive, default=3, help="timed runs per cell (median reported)")
    c.add_argument("--plot", default=None, metavar="PNG")
    c.add_argument("--json", default=None, metavar="PATH")
    c.add_argument("--favor-sweep", action="store_true",
                   help="deprecated: use `memattn favor-sweep` (runs it with --seq-lens' first length, else 256)")
    c.set_defaults(func=_compare_or_favor_alias)
    ck = sub.add_parser("compare-kv", help="the inference memory table: KV cache formats, paging, sinks + window "
                                           "and the linear state, measured on this machine")
    ck_src = ck.add_mutually_exclusive_group()
    ck_src.add_argument("--preset", default="smollm2-135m", help="an engine preset's geometry, random weights "
                                                               "(default smollm2-135m; quality shows -)")
    ck_src.add_argument("--model", default=None, help="a local Hugging Face folder or .gguf file (adds quality)")
    ck.add_argument("--context", type=_int_list, default=[1024, 4096], help="comma-separated context lengths")
    ck.add_argument("--batch", type=_positive, default=1, help="sequences in the cache")
    ck.add_argument("--sinks", type=int, default=4, help="attention sinks of the window row")
    ck.add_argument("--window", type=_positive, default=1020, help="recent-token window of the window row")
    ck.add_argument("--eval-tokens", type=_positive, default=512, help="tokens of the perplexity evaluation")
    ck.add_argument("--repeats", type=_positive, default=5, help="timed decode steps per cell (median)")
    ck.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    ck.add_argument("--plot", default=None, metavar="PNG")
    ck.add_argument("--json", default=None, metavar="PATH")
    ck.set_defaults(func=cmd_compare_kv)
    f = sub.add_parser("favor-sweep", help="FAVOR+ error against exact softmax as random features grow (plot)")
    f.add_argument("--seq-len", type=_positive, default=256)
    f.add_argument("--head-dim", type=_positive, default=64)
    f.add_argument("--features", type=_int_list, default=FAVOR_FEATURES, help="comma-separated feature counts")
    f.add_argument("--plot", default="favor_sweep.png", metavar="PNG")
    f.set_defaults(func=cmd_favor_sweep)
    m = sub.add_parser("masks", help="inspect mask layouts")
    msub = m.add_subparsers(dest="masks_command", required=True)
    show = msub.add_parser("show", help="draw which tiles run (full / partial) and which are skipped")
    show.add_argument("spec", help='e.g. "sliding_window(127, 0) | global_tokens([0])"')
    show.add_argument("--seq-len", type=_positive, required=True)
    show.add_argument("--block", type=_positive, default=None, help="tile edge (default: about S/48)")
    show.add_argument("--png", default=None, metavar="PATH")
    show.set_defaults(func=cmd_masks_show)
    g = sub.add_parser("generate", help="generate text with the serving engine")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face folder or .gguf file")
    src.add_argument("--random", help="a random-initialised preset, e.g. tiny-llama")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="send the prompt as a user turn through the chat template")
    _add_sampling_args(g, 32)
    add_engine_args(g, num_kv_blocks=256)
    g.set_defaults(func=cmd_generate)
    ch = sub.add_parser("chat", help="an interactive chat in the terminal (stdin lines; /reset, /exit)")
    ch.add_argument("--model", required=True, help="local Hugging Face folder or .gguf file (or preset) with a chat template")
    ch.add_argument("--system", default=None, help="a system message to start the conversation with")
    _add_sampling_args(ch, 256)
    add_engine_args(ch)
    ch.set_defaults(func=cmd_chat)
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    sv.add_argument("--model", required=True, help="local Hugging Face folder, .gguf file or preset")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    sv.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_engine_args(sv)
    sv.set_defaults(func=cmd_serve)
    b = sub.add_parser("bench-serve", help="the serve workload through the engine (progress bar, summary table)")
    b.add_argument("--model", default=None, help="folder or preset (default llama-30m, random)")
    b.add_argument("--num-requests", type=_positive, default=64)
    b.add_argument("--max-prompt", type=_positive, default=512)
    b.add_argument("--max-output", type=_positive, default=256)
    b.add_argument("--seed", type=int, default=0, help="seed of the workload (prompts and lengths)")
    add_engine_args(b)
    b.set_defaults(func=cmd_bench_serve)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
