"""``memattn compare-kv``: every row, bytes per token against the formats' arithmetic and a real pool's
tensors, measured peaks in the order the formats' sizes imply, quality "-" without weights, bad options."""
from __future__ import annotations

import json
import math

import pytest

from memattn import cli, compare_kv
from memattn.cache import PagedKVCache, kv_formats
from memattn.engine.models import PRESETS, config_from_hf
from memattn.engine.streaming import StreamingPolicy

CONTEXTS = (512, 1024)
SINKS, WINDOW = 4, 60  # kept blocks (1 + 5) fit well under both contexts: the window row must stay flat


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckv")
    out_json, out_png = d / "kv.json", d / "kv.png"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["compare-kv", "--context", ",".join(map(str, CONTEXTS)), "--sinks", str(SINKS),
                       "--window", str(WINDOW), "--repeats", "1", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    return buf.getvalue(), json.loads(out_json.read_text()), out_png


def _geometry():
    return compare_kv.Geometry.of(config_from_hf(PRESETS[compare_kv.DEFAULT_PRESET]))


def test_default_preset_is_smollm2_geometry():
    g = _geometry()
    assert (g.num_layers, g.heads, g.kv_heads, g.head_dim) == (30, 9, 3, 64)


def test_table_has_every_row_and_context(run):
    text, recs, png = run
    names = compare_kv.row_names(SINKS, WINDOW)
    assert names[:2] == ["contiguous", "paged (auto)"] and set(kv_formats.QUANTIZED) <= set(names)
    assert f"sinks {SINKS} + window {WINDOW}" in names and "linear state" in names
    assert sorted((r["row"], r["context"]) for r in recs) == sorted((n, c) for n in names for c in CONTEXTS)
    for name in ("int8", "fp8_e4m3", "int4", "int2", "linear"):  # rich may wrap the longer names
        assert name in text
    assert png.stat().st_size > 0
    for r in recs:
        assert r["peak_mib"] > 0 and r["decode_s"] > 0


def test_bytes_per_token_match_the_formats_and_a_real_pool(run):
    _, recs, _ = run
    g = _geometry()
    geo = dict(num_layers=g.num_layers, kv_heads=g.kv_heads, head_dim=g.head_dim, block_size=compare_kv.BLOCK)
    by = {(r["row"], r["context"]): r for r in recs}
    for n in CONTEXTS:
        for fmt in kv_formats.FORMATS:
            row = "paged (auto)" if fmt == "auto" else fmt
            expect = kv_formats.bytes_per_token(fmt, **geo)
            pool = PagedKVCache(g.num_layers, 3, compare_kv.BLOCK, g.kv_heads, g.head_dim, kv_dtype=fmt)
            real = sum(t.numel() * t.element_size() for t in (pool.kv, *pool.meta)) / (3 * compare_kv.BLOCK)
            assert by[(row, n)]["bytes_per_token"] == expect == real, (fmt, n)
        full = 2 * g.num_layers * g.kv_heads * g.head_dim * 4
        assert by[("contiguous", n)]["bytes_per_token"] == full
        policy = StreamingPolicy(SINKS, WINDOW, compare_kv.BLOCK)
        kept = (policy.pinned_blocks + policy.window_blocks) * compare_kv.BLOCK
        assert by[(f"sinks {SINKS} + window {WINDOW}", n)]["bytes_per_token"] == full * kept / n
        state = g.num_layers * g.heads * g.head_dim * (g.head_dim + 1) * 4
        assert by[("linear state", n)]["bytes_per_token"] == state / n


def test_measured_peaks_are_ordered(run):
    _, recs, _ = run
    by = {(r["row"], r["context"]): r["peak_mib"] for r in recs}
    full_mib = 2 * 30 * 3 * 64 * 4 / 2**20
    for n in CONTEXTS:
        # the full-width caches hold N tokens: at least their bytes, measured
        assert by[("contiguous", n)] >= full_mib * n and by[("paged (auto)", n)] >= full_mib * n
        assert by[("int8", n)] < by[("paged (auto)", n)]
        assert by[("int4", n)] < by[("int8", n)]
        assert by[("int2", n)] < by[("int4", n)]
    a, b = CONTEXTS
    window = f"sinks {SINKS} + window {WINDOW}"
    assert math.isclose(by[(window, a)], by[(window, b)], rel_tol=0.01)  # bounded: flat across N
    assert math.isclose(by[("linear state", a)], by[("linear state", b)], rel_tol=0.01)
    assert by[("paged (auto)", b)] > 1.9 * by[("paged (auto)", a)]  # the unbounded ones grow with N


def test_quality_is_dash_without_a_model(run):
    text, recs, _ = run
    assert all(r["ppl"] is None and r["ppl_change"] is None for r in recs)
    rows = compare_kv.table_rows([compare_kv.KVRecord(**r) for r in recs])
    assert all(row[5] == "-" for row in rows)


@pytest.mark.parametrize("argv,message", [
    (["--context", "0"], "positive"),
    (["--context", "12,x"], "integers"),
    (["--window", "0"], "> 0"),
    (["--preset", "nope"], "unknown preset"),
    (["--sinks", "-1"], "sinks"),
    (["--model", "/no/such/model.gguf"], "error"),
    (["--model", "x", "--preset", "tiny-llama"], "not allowed"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    try:
        rc = cli.main(["compare-kv", *argv, "--repeats", "1"])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_quality_columns_from_perplexities():
    """ppl change is each row's perplexity over the full-width one; the linear row has none."""
    g = compare_kv.Geometry(1, 2, 1, 16)
    ppl = {"auto": 10.0, "int8": 10.1, "fp8_e4m3": 10.2, "int4": 10.5, "int2": 13.0, "window": 11.0}
    recs = compare_kv.run_compare_kv([32], g, sinks=4, window=12, repeats=1, ppl=ppl)
    by = {r.row: r for r in recs}
    assert by["contiguous"].ppl_change == 0.0 and by["paged (auto)"].ppl_change == 0.0
    assert math.isclose(by["int2"].ppl_change, 0.3) and math.isclose(by["sinks 4 + window 12"].ppl_change, 0.1)
    assert by["linear state"].ppl is None
    rows = {row[0]: row[5] for row in compare_kv.table_rows(recs)}
    assert rows["int2"] == "+30.000%" and rows["paged (auto)"] == "baseline (10.000)" and rows["linear state"] == "-"


def test_quality_on_a_tiny_model():
    """``quality`` (engine.evaluate's chunked feed): a window that covers the whole evaluation is the full-width
    cache exactly; a shorter one, and each quantized format, changes the perplexity, int8 by little and int2
    by more (random weights: the sizes of the changes, not their sign, are what holds)."""
    from memattn.engine.models import load_model

    model, _, tok = load_model("tiny-llama")
    ppl = compare_kv.quality(model, tok, 96, sinks=2, window=30, chunk=16)
    assert set(ppl) == {"auto", *kv_formats.QUANTIZED, "window"}
    assert ppl["window"] != ppl["auto"]
    assert compare_kv.quality(model, tok, 96, sinks=2, window=200, chunk=16)["window"] == ppl["auto"]
    assert 0 < abs(ppl["int8"] / ppl["auto"] - 1) < 1e-3
    assert abs(ppl["int2"] / ppl["auto"] - 1) > abs(ppl["int8"] / ppl["auto"] - 1)
