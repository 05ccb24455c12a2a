"""Context-parallel training: a small causal transformer whose sequence is sharded across ranks.

    torchrun --nproc_per_node 2 examples/context_parallel_train.py [--steps 5] [--seqlen 512]

Every rank holds the whole (tiny) model and 1/P of each sequence (zigzag layout, so causal work is
balanced). Attention is ``memattn.distributed.ring_attention``; everything else in a transformer
works token by token, so it runs on the shard as it is. Each rank's loss is its tokens' share of
the global mean, parameter gradients are summed across ranks, and the result is the gradient of
the full-sequence loss. To show it, every rank also trains an identical single-process copy on the
full sequence with ``memattn.attention`` and checks loss and gradients match at every step.
Without torchrun it runs as a ring of one.
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import memattn
import memattn.distributed as md

LAYOUT = "zigzag"


class Block(nn.Module):
    """Pre-norm transformer block with grouped-query attention; `attend(q, k, v)` does the attention."""

    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, attend):
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim)                 # (B, S, H, D)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)  # (B, S, Hkv, D) each
        x = x + self.proj(attend(q, k, v).reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=96, dim=64, heads=4, kv_heads=2, layers=2, max_len=4096):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens, positions, attend):
        """tokens, positions: (B, S) (a shard: positions say where each token sits in the full sequence)."""
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x, attend)
        return self.head(self.norm(x))


def loss_share(model, tokens, targets, positions, attend, total_tokens):
    """Sum of this shard's token losses over the global number of predicted tokens."""
    logits = model(tokens, positions, attend)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum") / total_tokens


def batch(step, batch_size, seqlen, vocab):
    """The same random sequences on every rank; targets are the next tokens (-100 at the end)."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(vocab, (batch_size, seqlen), generator=gen)
    targets = torch.cat([tokens[:, 1:], torch.full((batch_size, 1), -100)], dim=1)
    return tokens, targets


def setup():
    if "RANK" not in os.environ:  # plain `python`: a ring of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        md.init_process_group(timeout_s=120, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    else:
        md.init_process_group(timeout_s=120)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return dist.get_rank(), dist.get_world_size()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seqlen", type=int, default=512, help="a multiple of 2 * world size")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    rank, world = setup()

    torch.manual_seed(0)
    sharded, full = TinyLM(), TinyLM()
    full.load_state_dict(sharded.state_dict())
    opt_sharded = torch.optim.AdamW(sharded.parameters(), lr=3e-3)
    opt_full = torch.optim.AdamW(full.parameters(), lr=3e-3)
    vocab = sharded.head.out_features

    def ring(q, k, v):
        return md.ring_attention(q, k, v, causal=True, layout=LAYOUT)

    def single(q, k, v):
        return memattn.attention(q, k, v, causal=True)

    positions = torch.arange(args.seqlen).expand(args.batch, -1)
    local_positions = md.shard(positions, layout=LAYOUT)
    for step in range(args.steps):
        tokens, targets = batch(step, args.batch, args.seqlen, vocab)
        total = int((targets != -100).sum())

        # Context parallel: this rank's shard; gradients summed over ranks = full-sequence gradients.
        loss = loss_share(sharded, md.shard(tokens, layout=LAYOUT), md.shard(targets, layout=LAYOUT),
                          local_positions, ring, total)
        opt_sharded.zero_grad()
        loss.backward()
        for p in sharded.parameters():
            dist.all_reduce(p.grad)
        loss = loss.detach().clone()
        dist.all_reduce(loss)

        # The same step on one process with the whole sequence.
        ref_loss = loss_share(full, tokens, targets, positions, single, total)
        opt_full.zero_grad()
        ref_loss.backward()

        worst = max(((p.grad - r.grad).abs().max() / r.grad.abs().max().clamp_min(1e-12)).item()
                    for p, r in zip(sharded.parameters(), full.parameters()))
        if rank == 0:
            print(f"step {step}: loss {loss.item():.6f} (single process {ref_loss.item():.6f}), "
                  f"max relative gradient difference {worst:.1e}", flush=True)
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), "loss differs"
        assert worst <= 1e-4, f"gradients differ: {worst:.2e}"
        opt_sharded.step()
        opt_full.step()
    if rank == 0:
        print(f"ok: {world} rank(s), {args.steps} steps, sequence of {args.seqlen} sharded {LAYOUT}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
