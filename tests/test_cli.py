"""The command line: compare (the main job), masks show, favor sweep, the engine's shared argument group."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest
import torch

from conftest import amax, attention_floors
from memattn import cli, compare, mask_spec, masks
from memattn.engine import EngineConfig
from memattn.engine.args import engine_config_from_args, parse_bytes


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


@pytest.mark.parametrize("argv", [["favor-sweep", "--seq-len", "64"], ["compare", "--favor-sweep", "--seq-lens", "64"]],
                         ids=["subcommand", "deprecated-flag"])
def test_favor_sweep_plot(argv, tmp_path, capsys):
    png = tmp_path / "f.png"
    assert cli.main([*argv, "--head-dim", "16", "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.strip().startswith("│")]
    errors = [float(r.split("│")[2]) for r in rows]
    assert len(errors) == len(cli.FAVOR_FEATURES)
    assert errors[-1] < errors[0]  # more features, less error
    assert png.stat().st_size > 1000
    assert ("deprecated" in captured.err) == (argv[0] == "compare")


# ---- the engine's argument group (generate, bench-serve) ------------------------------------------------

COMMANDS = {"generate": ["generate", "--random", "tiny-llama", "--prompt", "hi"], "bench-serve": ["bench-serve"]}
# Every EngineConfig field: its flag, a value to type, the value it must give (a new field must join the table)
ENGINE_FLAGS = {
    "block_size": (["--block-size", "8"], 8),
    "kv_cache_memory": (["--kv-cache-memory", "3MiB"], 3 << 20),
    "num_kv_blocks": None,  # excludes --kv-cache-memory: its own test below
    "max_num_seqs": (["--max-num-seqs", "3"], 3),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "64"], 64),
    "max_model_len": (["--max-model-len", "128"], 128),
    "enable_prefix_caching": (["--no-enable-prefix-caching"], False),
    "preemption": (["--preemption", "swap"], "swap"),
    "swap_space": (["--swap-space", "2GiB"], 2 << 30),
    "dtype": (["--dtype", "bfloat16"], torch.bfloat16),
    "kv_cache_dtype": (["--kv-cache-dtype", "int8"], "int8"),
    "device": (["--device", "cpu"], torch.device("cpu")),
    "seed": (["--model-seed", "7"], 7),
    "attention_sinks": (["--attention-sinks", "4"], 4),
    "streaming_window": (["--streaming-window", "64"], 64),
}


def _config(argv):
    return engine_config_from_args(cli.build_parser().parse_args(argv))


def test_engine_flags_cover_every_field_and_commands_share_them():
    assert set(ENGINE_FLAGS) == {f.name for f in dataclasses.fields(EngineConfig)}
    flags = [a for v in ENGINE_FLAGS.values() if v for a in v[0]]
    want = EngineConfig(**{name: v[1] for name, v in ENGINE_FLAGS.items() if v})
    for command in COMMANDS.values():
        assert _config(command + flags) == want
        assert _config(command + ["--num-kv-blocks", "12"]).num_kv_blocks == 12


def test_engine_defaults_per_command():
    """generate keeps its 256-block pool, bench-serve its 256 MiB; giving the pool's size either way
    replaces the command's default."""
    assert _config(COMMANDS["generate"]) == EngineConfig(num_kv_blocks=256)
    assert _config(COMMANDS["bench-serve"]) == EngineConfig(kv_cache_memory=256 << 20)
    assert _config(COMMANDS["generate"] + ["--kv-cache-memory", "1MiB"]) == EngineConfig(kv_cache_memory=1 << 20)


def test_deprecated_pool_flags_still_work(capsys):
    for command in COMMANDS.values():
        assert _config(command + ["--kv-mib", "3"]) == EngineConfig(kv_cache_memory=3 << 20)
        assert _config(command + ["--kv-blocks", "5"]) == EngineConfig(num_kv_blocks=5)
        for both in (["--kv-mib", "1", "--kv-cache-memory", "1MiB"], ["--kv-blocks", "4", "--kv-cache-memory", "1MiB"],
                     ["--num-kv-blocks", "4", "--kv-cache-memory", "1MiB"]):
            with pytest.raises(SystemExit):
                _config(command + both)
            assert "not allowed with" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            cli.main([command[0], "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--kv-mib N deprecated alias: use --kv-cache-memory" in text
        assert "--kv-blocks N deprecated alias: use --num-kv-blocks" in text


@pytest.mark.parametrize("bad, message", [(["--block-size", "0"], "block_size must be"),
                                          (["--kv-mib", "0"], "kv_cache_memory must be"),
                                          (["--kv-cache-memory", "256MB"], "binary unit|unit in"),
                                          (["--dtype", "int8"], "invalid choice"),
                                          (["--device", "gpu0"], "not a torch device"),
                                          (["--max-num-seqs", "two"], "invalid int value")])
def test_engine_flags_validated_as_parsed(bad, message, capsys):
    with pytest.raises(SystemExit) as e:
        _config(COMMANDS["bench-serve"] + bad)
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_parse_bytes():
    assert [parse_bytes(t) for t in ("4096", "256MiB", "1GiB", "2 KiB", "7B")] == [4096, 256 << 20, 1 << 30, 2048, 7]
    for bad in ("1.5GiB", "256MB", "256mib", "-1", "MiB", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bytes(bad)
