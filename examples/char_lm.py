"""A character-level causal language model on this repository's own documentation, with softmax or YOSO
attention, and generation token by token with YOSO's carried state.

The text is README.md and docs/*.md of this repository (about 100 KB; the last 10% is held out). The models
share everything -- seed, initialisation, data order, optimiser, steps -- except the attention: ``softmax``
(torch's scaled_dot_product_attention, causal), ``yoso`` (yoso_models.nn.YosoSelfAttention, causal N-YOSO-m,
fresh hash functions every training step) and ``yoso-c`` (the same with the paper's YOSO-C depthwise
convolution over the last ``--conv-window`` values of each head, which the state carries too). Validation
perplexity is per character; YOSO's is reported with the sampled attention it generates with (one fixed draw
of hash functions, ``eval_seed``) and with its expectation (YOSO-E, quadratic, the layer's default ``eval()``).

Generation prefills the prompt in one call per layer and then decodes one character per call, each layer
carrying its ``yoso.State`` (``past_state=`` / ``use_cache=True``): constant work per token, whatever the
context. The script asserts that the logits of every decoding step equal those of a full recomputation
over the whole generated text (same hash functions), then prints the text.

    python examples/char_lm.py                  # a few minutes per model on a 2-core CPU (README.md)
    python examples/char_lm.py --smoke          # seconds: a wiring check (the models nox session runs it)

Needs ``pip install -e "packages/yoso-models[torch]"`` and a backend (``pip install -e packages/yoso-jax``, the
fast CPU path for torch tensors, or ``packages/yoso-reference``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import yoso
from yoso_models.nn import YosoSelfAttention

ROOT = Path(__file__).resolve().parents[1]


# ---- data ----------------------------------------------------------------------------------------------


def load_text(root: Path = ROOT) -> str:
    """README.md and docs/*.md, in a fixed order."""
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.is_file())


class Corpus:
    def __init__(self, text: str, held_out: float = 0.1):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.index[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * (1 - held_out))
        self.train, self.val = ids[:cut], ids[cut:]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(self, generator: torch.Generator, batch: int, length: int):
        """Random windows of the training text: inputs and next-character targets ``[batch, length]``."""
        starts = torch.randint(0, len(self.train) - length - 1, (batch,), generator=generator)
        rows = torch.stack([self.train[s : s + length + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


# ---- the model -----------------------------------------------------------------------------------------


class SoftmaxSelfAttention(nn.Module):
    """Causal multi-head softmax attention with the same four projections as YosoSelfAttention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, past_state=None, use_cache=False):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))
        return (out, None) if use_cache else out


class Block(nn.Module):
    def __init__(self, dim: int, attention: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, past_state=None, use_cache=False):
        out = self.attention(self.ln1(x), past_state=past_state, use_cache=use_cache)
        attended, state = out if use_cache else (out, None)
        x = x + attended
        x = x + self.mlp(self.ln2(x))
        return (x, state) if use_cache else x


class CharLM(nn.Module):
    """Embeddings (characters, learned absolute positions), pre-norm transformer blocks, a linear head."""

    def __init__(
        self, vocab: int, *, dim: int, layers: int, heads: int, context: int, attention: str, yoso_options: dict
    ):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(context, dim)

        def make_attention():
            if attention == "softmax":
                return SoftmaxSelfAttention(dim, heads)
            conv = {"conv_window": yoso_options["conv_window"]} if attention == "yoso-c" else {}
            options = {k: v for k, v in yoso_options.items() if k != "conv_window"}
            return YosoSelfAttention(dim, heads, causal=True, eval_mode="sample", eval_seed=0, **options, **conv)

        self.blocks = nn.ModuleList(Block(dim, make_attention()) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids, states=None, start: int = 0, use_cache: bool = False):
        """Logits ``[B, N, vocab]`` of the characters after ``ids [B, N]`` at positions ``start...``; with
        ``use_cache`` also the per-layer states, and ``states`` continues them."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position(positions)
        new_states = []
        for i, block in enumerate(self.blocks):
            if use_cache:
                x, state = block(x, past_state=None if states is None else states[i], use_cache=True)
                new_states.append(state)
            else:
                x = block(x)
        logits = self.head(self.norm(x))
        return (logits, new_states) if use_cache else logits


def build(kind: str, vocab: int, args) -> CharLM:
    torch.manual_seed(args.seed)  # the same initialisation for both models (their parameters have equal shapes)
    yoso_options = dict(num_hashes=args.num_hashes, hash_bits=args.hash_bits, conv_window=args.conv_window)
    return CharLM(
        vocab,
        dim=args.dim,
        layers=args.layers,
        heads=args.heads,
        context=args.context,
        attention=kind,
        yoso_options=yoso_options,
    )


# ---- training and evaluation ---------------------------------------------------------------------------


def train(model: CharLM, corpus: Corpus, args) -> tuple[list[float], float]:
    data = torch.Generator().manual_seed(args.seed + 1)  # the same data order for both models
    torch.manual_seed(args.seed + 2)  # and the same hash-function draws where there are any
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    losses, started = [], time.perf_counter()
    for step in range(args.steps):
        inputs, targets = corpus.batch(data, args.batch, args.context)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if args.log_every and (step + 1) % args.log_every == 0:
            recent = sum(losses[-args.log_every :]) / args.log_every
            print(f"  step {step + 1:>5}: loss {recent:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return losses, time.perf_counter() - started


@torch.no_grad()
def perplexity(model: CharLM, corpus: Corpus, args) -> float:
    """exp(mean negative log-likelihood per character) over non-overlapping windows of the held-out text."""
    model.eval()
    length = args.context
    usable = (len(corpus.val) - 1) // length * length
    inputs = corpus.val[:usable].view(-1, length)
    targets = corpus.val[1 : usable + 1].view(-1, length)
    total, count = 0.0, 0
    for i in range(0, len(inputs), args.batch):
        logits = model(inputs[i : i + args.batch])
        total += F.cross_entropy(logits.flatten(0, 1), targets[i : i + args.batch].flatten(), reduction="sum").item()
        count += targets[i : i + args.batch].numel()
    return math.exp(total / count)


def set_yoso_eval_mode(model: CharLM, mode: str) -> None:
    """What the YOSO layers compute in eval(): the fixed sampled draw ("sample") or YOSO-E ("expectation")."""
    for block in model.blocks:
        block.attention.eval_mode = mode
        block.attention.eval_seed = 0 if mode == "sample" else None


@torch.no_grad()
def generate(model: CharLM, corpus: Corpus, prompt: str, new_tokens: int, seed: int):
    """``(text, seconds per token)``: the prompt prefilled in one call per layer, then one character per call
    carrying the layers' states; every step's logits are checked against a full recomputation."""
    model.eval()
    ids = torch.tensor([[corpus.index[c] for c in prompt]])
    sampler = torch.Generator().manual_seed(seed)
    logits, states = model(ids, use_cache=True)
    steps = [logits[:, -1]]
    started = time.perf_counter()
    for _ in range(new_tokens):
        probabilities = torch.softmax(steps[-1] / 0.8, dim=-1)
        token = torch.multinomial(probabilities, 1, generator=sampler)
        ids = torch.cat([ids, token], dim=1)
        if ids.shape[1] == model.context:
            break
        logits, states = model(token, states=states, start=ids.shape[1] - 1, use_cache=True)
        steps.append(logits[:, -1])
    per_token = (time.perf_counter() - started) / max(1, len(steps) - 1)
    # Full recomputation over the generated text, with the same (fixed) hash functions: the same logits.
    full = model(ids[:, : len(steps) + len(prompt) - 1])
    recomputed = full[:, len(prompt) - 1 :]
    incremental = torch.stack(steps[: recomputed.shape[1]], dim=1)
    torch.testing.assert_close(incremental, recomputed, rtol=1e-4, atol=1e-4)
    numbers = sum(t.numel() for state in states for t in _tensors(state))
    return corpus.decode(ids[0]), per_token, numbers


def _tensors(state):
    """Every tensor a layer's state holds (a yoso.State, or YOSO-C's pair of one and the last values)."""
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for part in state if part is not None for t in _tensors(part)]


# ---- main ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128, help="training window and longest generation")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--num-hashes", type=int, default=16, help="m, hashes per YOSO call")
    p.add_argument("--hash-bits", type=int, default=6, help="tau")
    p.add_argument("--conv-window", type=int, default=4, help="YOSO-C's convolution window (the yoso-c model)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generate", type=int, default=120, help="characters to generate (at most --context)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--models", default="softmax,yoso,yoso-c", help="comma-separated: softmax, yoso, yoso-c")
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--smoke", action="store_true", help="a tiny model for a few steps: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.context, args.dim, args.heads = 6, 4, 32, 32, 2
        args.num_hashes, args.hash_bits, args.generate, args.log_every, args.conv_window = 4, 4, 12, 0, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = Corpus(load_text())
    print(
        f"text: README.md + docs/*.md, {len(corpus.train) + len(corpus.val)} characters ({len(corpus.chars)} "
        f"distinct), {len(corpus.val)} held out; {args.layers} layers, dim {args.dim}, {args.heads} heads, "
        f"context {args.context}, {args.steps} steps of {args.batch}; YOSO m = {args.num_hashes}, tau = "
        f"{args.hash_bits}, YOSO-C window {args.conv_window}; backend for torch tensors: "
        f"{yoso.backend_for(*(torch.zeros(1, 4, 8) for _ in range(3)), causal=True)}",
        flush=True,
    )
    rows = []
    prompt = corpus.decode(corpus.val[: min(24, args.context // 2)])
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        print(f"{kind}: training", flush=True)
        model = build(kind, len(corpus.chars), args)
        losses, seconds = train(model, corpus, args)
        if kind.startswith("yoso"):
            name = f"{kind}-{args.num_hashes}" + (f", window {args.conv_window}" if kind == "yoso-c" else "")
            set_yoso_eval_mode(model, "sample")
            rows.append((f"{name} (sampled, fixed hash functions)", perplexity(model, corpus, args), seconds))
            set_yoso_eval_mode(model, "expectation")
            rows.append((f"{name}: same model, eval = expectation", perplexity(model, corpus, args), None))
            set_yoso_eval_mode(model, "sample")
            text, per_token, numbers = generate(model, corpus, prompt, args.generate, args.seed)
            print(
                f"{kind}: generated with the carried state ({1e3 * per_token:.1f} ms per character; state: "
                f"{numbers} numbers for the {args.layers} layers, tables and hash functions, whatever the length); "
                f"every step's logits equal a full recomputation's:\n---\n{text}\n---",
                flush=True,
            )
        else:
            rows.append((kind, perplexity(model, corpus, args), seconds))
    print("\n| attention | validation perplexity (per character) | training time [s] |\n|---|---:|---:|")
    for name, ppl, seconds in rows:
        print(f"| {name} | {ppl:.2f} | {'—' if seconds is None else f'{seconds:.0f}'} |")
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s){load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
