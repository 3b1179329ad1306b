"""ListOps on a CPU: softmax vs YOSO-E vs YOSO-32 attention in the same small transformer.

ListOps (Nangia & Bowman 2018; the Long Range Arena task) asks for the value of a nested expression over
digits, e.g. ``[MAX 4 [MIN 2 3 ] 1 [SM 5 8 ] ]`` = 4, with the operators MIN, MAX, MED (median) and SM
(sum modulo 10): ten classes. The data are generated here (seeded), with shorter sequences than LRA's
500-2000 tokens so that three models train on a 2-core CPU in minutes.

All three models share everything -- seed, initialisation, data order, optimiser, steps -- except the
attention: ``softmax`` (torch's scaled_dot_product_attention), ``yoso-e`` (yoso_models.nn.YosoSelfAttention
with mode="expectation") and ``yoso-32`` (mode="sample", 32 hashes; its test accuracy is reported both with
sampled attention at evaluation and with the layer's default eval(), the expectation).

    python examples/listops.py                      # the run recorded in README.md
    python examples/listops.py --smoke              # seconds: a wiring check (the nox session runs it)

Needs ``pip install -e "packages/yoso-models[torch]"`` and a backend (``pip install -e packages/yoso-reference``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import yoso
from yoso_models.nn import YosoSelfAttention

# ---- data ----------------------------------------------------------------------------------------------

OPERATORS = ("MIN", "MAX", "MED", "SM")
PAD = 0
VOCAB = ["<pad>", "]"] + [f"[{op}" for op in OPERATORS] + [str(d) for d in range(10)]
TOKEN = {t: i for i, t in enumerate(VOCAB)}


def random_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, p_branch: float):
    """A digit, or ``(operator, [children])``; the root is always an operator."""
    if depth >= max_depth or (depth > 0 and rng.random() > p_branch):
        return rng.randrange(10)
    arity = rng.randint(2, max_args)
    return rng.choice(OPERATORS), [random_tree(rng, depth + 1, max_depth, max_args, p_branch) for _ in range(arity)]


def evaluate(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [evaluate(c) for c in children]
    if op == "MIN":
        return min(values)
    if op == "MAX":
        return max(values)
    if op == "MED":
        return statistics.median_low(values)
    return sum(values) % 10


def tokens(tree) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    return [f"[{op}"] + [t for c in children for t in tokens(c)] + ["]"]


def make_dataset(n: int, rng: random.Random, *, min_len: int, max_len: int, exclude=frozenset(), **tree_args):
    """``n`` distinct expressions with ``min_len <= length <= max_len`` tokens (none of them in ``exclude``)."""
    seen, data = set(exclude), []
    while len(data) < n:
        tree = random_tree(rng, 0, **tree_args)
        seq = tuple(tokens(tree))
        if min_len <= len(seq) <= max_len and seq not in seen:
            seen.add(seq)
            data.append(([TOKEN[t] for t in seq], evaluate(tree)))
    return data, seen


def batches(data, batch_size: int, rng: random.Random | None):
    """Batches of similar lengths (less padding); shuffled when ``rng`` is given."""
    order = list(range(len(data)))
    if rng is not None:
        rng.shuffle(order)
    pool = 50 * batch_size
    out = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: len(data[i][0]))
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if rng is not None:
        rng.shuffle(out)
    for idx in out:
        length = max(len(data[i][0]) for i in idx)
        ids = torch.full((len(idx), length), PAD, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(data[i][0])] = torch.tensor(data[i][0])
        yield ids, torch.tensor([data[i][1] for i in idx])


# ---- model ---------------------------------------------------------------------------------------------


class SoftmaxSelfAttention(nn.Module):
    """The baseline: the same projections as YosoSelfAttention around torch's SDPA."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, key_padding_mask):
        b, n, e = x.shape
        split = lambda t: t.view(b, n, self.num_heads, e // self.num_heads).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :])
        return self.dropout(self.out_proj(out.transpose(1, 2).reshape(b, n, e)))


class Block(nn.Module):
    def __init__(self, attention: nn.Module, dim: int, ffn: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = attention
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim), nn.Dropout(dropout))

    def forward(self, x, mask):
        x = x + self.attention(self.norm1(x), mask)
        return x + self.ffn(self.norm2(x))


class Classifier(nn.Module):
    """Token + position embeddings, pre-norm blocks, mean pooling over real tokens, 10 classes."""

    def __init__(self, attention: str, *, dim: int, heads: int, layers: int, ffn: int, max_len: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim, padding_idx=PAD)
        self.position = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(
            Block(_attention(attention, dim, heads, dropout), dim, ffn, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, ids):
        mask = ids != PAD
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1]))[None]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x) * mask[..., None]
        return self.head(x.sum(1) / mask.sum(1, keepdim=True))


def _attention(kind: str, dim: int, heads: int, dropout: float) -> nn.Module:
    if kind == "softmax":
        return SoftmaxSelfAttention(dim, heads, dropout)
    if kind == "yoso-e":
        return YosoSelfAttention(dim, heads, mode="expectation", hash_bits=8, dropout=dropout)
    if kind == "yoso-32":
        return YosoSelfAttention(dim, heads, mode="sample", num_hashes=32, hash_bits=8, dropout=dropout)
    raise ValueError(f"unknown attention {kind!r}")


# ---- training ------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model, data, batch_size: int) -> float:
    model.eval()
    correct = sum(int((model(ids).argmax(-1) == y).sum()) for ids, y in batches(data, batch_size, None))
    model.train()
    return 100.0 * correct / len(data)


def train(kind: str, train_set, test_set, args) -> dict:
    torch.manual_seed(args.seed)  # the same initialisation for every attention (the layers' shapes agree)
    model = Classifier(
        kind,
        dim=args.dim,
        heads=args.heads,
        layers=args.layers,
        ffn=args.ffn,
        max_len=args.max_len,
        dropout=args.dropout,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    data_rng = random.Random(args.seed)
    torch.manual_seed(args.seed + 1)  # dropout and hash functions
    start, step, losses = time.perf_counter(), 0, []
    while step < args.steps:
        for ids, y in batches(train_set, args.batch_size, data_rng):
            loss = F.cross_entropy(model(ids), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                print(f"  {kind:8s} step {step:5d}  loss {statistics.fmean(losses[-args.log_every :]):.3f}", flush=True)
            if step == args.steps:
                break
    train_time = time.perf_counter() - start
    result = {"attention": kind, "train_s": train_time}
    torch.manual_seed(args.seed + 2)
    if kind == "yoso-32":
        for layer in model.modules():
            if isinstance(layer, YosoSelfAttention):
                layer.eval_mode = "sample"  # fresh hashes per batch, from the seed above
        result["test_sampled"] = accuracy(model, test_set, args.batch_size)
        for layer in model.modules():
            if isinstance(layer, YosoSelfAttention):
                layer.eval_mode = "expectation"
    result["test"] = accuracy(model, test_set, args.batch_size)
    result["total_s"] = time.perf_counter() - start
    return result


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} cores)"
    except (OSError, IndexError):
        return platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", nargs="+", default=["softmax", "yoso-e", "yoso-32"])
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=112)
    p.add_argument("--max-depth", type=int, default=6)
    p.add_argument("--max-args", type=int, default=5)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="a few steps on a few examples: checks the wiring in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_size, args.test_size, args.steps, args.log_every = 64, 32, 3, 1
        args.min_len, args.max_len, args.max_depth = 8, 40, 3
    torch.set_num_threads(args.threads)

    rng = random.Random(args.seed)
    tree_args = {"max_depth": args.max_depth, "max_args": args.max_args, "p_branch": 0.3}
    lengths = {"min_len": args.min_len, "max_len": args.max_len}
    t0 = time.perf_counter()
    train_set, seen = make_dataset(args.train_size, rng, **lengths, **tree_args)
    test_set, _ = make_dataset(args.test_size, rng, exclude=seen, **lengths, **tree_args)
    mean_len = statistics.fmean(len(s) for s, _ in train_set)
    majority = max(sum(y == c for _, y in test_set) for c in range(10)) / len(test_set) * 100
    print(
        f"ListOps: {len(train_set)} train / {len(test_set)} test expressions, {args.min_len}-{args.max_len} tokens "
        f"(mean {mean_len:.1f}), depth <= {args.max_depth}, <= {args.max_args} args; majority class {majority:.2f}% "
        f"[{time.perf_counter() - t0:.1f} s]"
    )
    print(
        f"model: {args.layers} layers, dim {args.dim}, {args.heads} heads, ffn {args.ffn}; {args.steps} steps of "
        f"{args.batch_size}, AdamW lr {args.lr}, seed {args.seed}; yoso backend {yoso.get_backend() or 'auto'}; "
        f"torch {torch.__version__}, {args.threads} torch thread(s)\n"
        f"machine: {_cpu()}, load average {os.getloadavg()[0]:.1f} at start (a shared machine: timings are noisy)"
    )
    results = []
    for kind in args.attention:
        results.append(train(kind, train_set, test_set, args))
        r = results[-1]
        extra = f", sampled eval {r['test_sampled']:.2f}%" if "test_sampled" in r else ""
        print(f"  {kind:8s} test {r['test']:.2f}%{extra}  ({r['train_s']:.0f} s training, {r['total_s']:.0f} s total)")

    print("\n| attention | test accuracy [%] | training time [s] |")
    print("|---|---:|---:|")
    for r in results:
        if "test_sampled" in r:
            print(f"| {r['attention']} (eval: sampled, m = 32) | {r['test_sampled']:.2f} | {r['train_s']:.0f} |")
            print(f"| {r['attention']} (eval: expectation) | {r['test']:.2f} | (same model) |")
        else:
            print(f"| {r['attention']} | {r['test']:.2f} | {r['train_s']:.0f} |")
    print(f"\ntotal run time {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
