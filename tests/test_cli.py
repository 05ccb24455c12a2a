"""The command line: compare (the main job), masks show, favor sweep."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import amax, attention_floors
from memattn import cli, compare, mask_spec, masks


def test_compare_prints_table_and_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    rc = cli.main(["compare", "--seq-lens", "128,256", "--heads", "2", "--head-dim", "16", "--repeats", "1",
                   "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("standard", "checkpoint", "blockwise", "window", "linear"):
        assert name in text
    recs = json.loads(out_json.read_text())
    assert {r["method"] for r in recs} == {"standard", "checkpoint", "blockwise", "window", "linear"}
    assert {r["seq_len"] for r in recs} == {128, 256}
    fields = {"method", "seq_len", "batch", "heads", "head_dim", "dtype", "backward", "peak_mib", "est_mib",
              "time_s", "max_err", "status"}
    for r in recs:
        assert fields <= set(r)
        assert r["status"] == "ok" and r["peak_mib"] > 0 and r["time_s"] > 0
        if r["method"] != "linear":  # exact methods match the float64 reference within the derived bound
            q, k, v = compare._inputs(1, r["seq_len"], 2, 16, torch.float32, False, 0)  # run_compare's seed 0
            bound = attention_floors(q, k, v)["out_alone"] + torch.finfo(torch.float32).eps / 2 * amax(v)
            assert r["max_err"] <= bound, (r["method"], r["seq_len"], r["max_err"], bound)
    std = next(r for r in recs if r["method"] == "standard" and r["seq_len"] == 256)
    blk = next(r for r in recs if r["method"] == "blockwise" and r["seq_len"] == 256)
    assert std["peak_mib"] > blk["peak_mib"]
    assert out_png.stat().st_size > 1000


def test_compare_backward_stack(tmp_path):
    out_json = tmp_path / "b.json"
    assert cli.main(["compare", "--seq-lens", "256", "--heads", "2", "--head-dim", "16", "--backward", "--layers",
                     "3", "--methods", "standard,checkpoint,blockwise", "--repeats", "1", "--json", str(out_json)]) == 0
    recs = {r["method"]: r for r in json.loads(out_json.read_text())}
    assert all(r["backward"] and r["layers"] == 3 for r in recs.values())
    # standard keeps every layer's probabilities for backward; checkpointing keeps none
    assert recs["standard"]["peak_mib"] > recs["checkpoint"]["peak_mib"] > recs["blockwise"]["peak_mib"]


def test_compare_rejects_unknown_method(capsys):
    assert cli.main(["compare", "--methods", "standard,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_masks_show(tmp_path, capsys):
    png = tmp_path / "m.png"
    assert cli.main(["masks", "show", "sliding_window(63, 0) | global_tokens([0])", "--seq-len", "512",
                     "--block", "32", "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "█" in text and "·" in text and png.stat().st_size > 1000
    assert cli.main(["masks", "show", "causal() & __import__('os')", "--seq-len", "64"]) == 2


def test_mask_spec_parses_only_known_factories():
    m = mask_spec.parse("causal & sliding_window(10, 0) | bigbird(8, 3, 1, 1, 0)")
    assert isinstance(m, masks.OrMask)
    with pytest.raises(ValueError, match="unexpected"):
        mask_spec.parse("open('x')")
    with pytest.raises(ValueError, match="literals"):
        mask_spec.parse("sliding_window(x, 0)")


def test_favor_sweep_plot(tmp_path, capsys):
    png = tmp_path / "f.png"
    assert cli.main(["compare", "--favor-sweep", "--seq-lens", "64", "--head-dim", "16", "--plot", str(png)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("│")]
    errors = [float(r.split("│")[2]) for r in rows]
    assert errors[-1] < errors[0]  # more features, less error
    assert png.stat().st_size > 1000
