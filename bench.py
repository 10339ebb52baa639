"""
Benchmarks, measured here rather than asserted in tests; each compares within one run, since
machines are shared and noisy:

    python bench.py step        # training step: our block vs torch.nn.TransformerEncoderLayer, same loop
    python bench.py step --device cuda --dtype bfloat16 --compile
    python bench.py sudoku      # augmented training puzzles/s, base puzzles/s per tier (1 and 2 workers)
    python bench.py chess       # verified mate-in-N puzzles/s per depth (1 and 2 workers)

A benchmark is a function bench_<name>(args) printing a small table; add it to BENCHMARKS at the bottom.
"""

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import tasks
from looped import LoopedConfig, LoopedTransformer, window_mask, iterate, check_types, check_range, check_choice
from train import OneLineParser, add_fields, pick_device


def per_second(fn, items, min_seconds=1.0):
    """items processed per second by repeated calls of fn() (each handling `items`), over at least min_seconds."""
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    return calls * items / (time.perf_counter() - t0)


def bench_sudoku(args):
    # (a) training batches: augmented transforms of base puzzles drawn from a training pool
    with tempfile.TemporaryDirectory() as cache_dir:
        task = tasks.Sudoku(cache_dir=cache_dir)
        task.pool_size = 200
        task.train_batch('r1-4', 1, torch.Generator())    # builds the pool (not timed)
        gen = torch.Generator().manual_seed(0)
        print(f"\n{'train_batch':>12} | {'puzzles/s':>10}")
        for batch in (64, 1024):
            rate = per_second(lambda: task.train_batch('r1-4', batch, gen), batch)
            print(f"{'batch ' + str(batch):>12} | {rate:10.0f}")

    # (b) base puzzles per tier, generated from scratch (no cache), in 1 and 2 worker processes
    sizes = {'r1-4': 100, 'r5-8': 100, 'r9-16': 100, 'r17+': 16, 'g1-2': 24, 'g3+': 16}
    print(f"\n{'tier':>8} | {'puzzles':>7} | {'1 worker /s':>11} | {'2 workers /s':>12} | {'clues':>5} | "
          f"{'rounds':>6} | {'guesses':>7}")
    for tier, n in sizes.items():
        rates = []
        for workers in (1, 2):
            t0 = time.perf_counter()
            pool = tasks.generate_sudoku(tier, 'test', n, 0, workers=workers, verbose=False)
            rates.append(n / (time.perf_counter() - t0))
        clues = (pool['puzzles'] > 0).sum(1).float().mean()
        rounds, guesses = pool['rounds'].float().mean(), pool['guesses'].float().mean()
        print(f"{tier:>8} | {n:7d} | {rates[0]:11.1f} | {rates[1]:12.1f} | {clues:5.1f} | {rounds:6.1f} | "
              f"{guesses:7.2f}")


# ----------------------------------------------------------------------------------------- step

class TorchLayerLoop(nn.Module):
    """The baseline: the same loop (embedding, standard recall W [h ; e], outer LayerNorm, readout)
    around PyTorch's own nn.TransformerEncoderLayer (pre-norm, GELU, no dropout) instead of our Block.
    It has no rotary positions, so it gets learned absolute ones."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, d = cfg, cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.block_size, d)
        self.recall_proj = nn.Linear(2 * d, d, bias=cfg.bias)
        self.block = nn.TransformerEncoderLayer(d, cfg.n_head, cfg.mlp_ratio * d, dropout=0.0, activation='gelu',
                                                batch_first=True, norm_first=True, bias=cfg.bias)
        self.ln_out, self.ln_f = nn.LayerNorm(d, bias=cfg.bias), nn.LayerNorm(d, bias=cfg.bias)
        self.head = nn.Linear(d, cfg.n_classes, bias=cfg.bias)

    def embed(self, idx):
        return self.tok_emb(idx) + self.pos_emb(torch.arange(idx.size(1), device=idx.device))

    def initial_state(self, e, generator=None):
        return e

    def step(self, h, e):
        T, cfg = h.size(1), self.cfg
        if cfg.window:
            mask = ~window_mask(T, cfg.window, cfg.causal, h.device)       # True = masked, nn.Transformer's convention
        else:
            mask = nn.Transformer.generate_square_subsequent_mask(T, device=h.device) if cfg.causal else None
        return self.ln_out(self.block(self.recall_proj(torch.cat((h, e), -1)), src_mask=mask,
                                      is_causal=cfg.causal and not cfg.window))

    def readout(self, h):
        return self.head(self.ln_f(h))


def time_train_steps(model, x, y, n_iters, repeats, ctx, step_fn=None):
    """Median seconds of one training step: n_iters iterations with full backprop, CE, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_fn = step_fn or model.step
    times = []
    for r in range(repeats + 2):                                 # two warm-up steps (allocations, compilation)
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx:
            e = model.embed(x)
            for h, _, _ in iterate(step_fn, model.initial_state(e), e, n_iters):
                pass
            loss = F.cross_entropy(model.readout(h).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        if r >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


PREFIX = dict(vocab_size=2, n_classes=2, d_model=64, n_head=4, causal=True)
STEP_CONFIGS = {  # name: (LoopedConfig fields, batch size)
    # the prefix-sums quick start (its start token left out: the baseline has none)
    'readme': (dict(PREFIX, block_size=16, n_iters=40, window=2), 64),
    # the same model on 512-bit strings, as when testing length generalization (banded attention)
    'long': (dict(PREFIX, block_size=512, n_iters=8, window=2), 16),
    'large': (dict(vocab_size=2, n_classes=2, block_size=128, d_model=256, n_head=8, n_iters=8, causal=True), 16),
    # the chess block: local board graph with a learned bias per board offset (the baseline attends everywhere)
    'chess': (dict(vocab_size=13, n_classes=3, block_size=64, pos='learned', causal=False, graph='chess_local',
                   board_bias=True, d_model=64, n_head=4, n_iters=16), 32),
}


def bench_step(args):
    """Training step of LoopedTransformer vs the TorchLayerLoop baseline, same loop, same sizes.
    Rounds alternate the two models; the ratio is taken within each round, then the median."""
    device = pick_device(args.device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == 'bfloat16' else nullcontext()
    print(f"device {device} | threads {torch.get_num_threads()} | dtype {args.dtype} | compile {args.compile} | "
          f"{args.rounds} rounds x {args.repeats} steps, medians")
    print(f"{'config':>8} | {'ours ms':>8} | {'torch layer ms':>14} | {'ratio ours/torch':>16}")
    for name in args.configs.split(','):
        config, batch = STEP_CONFIGS[name]
        cfg = LoopedConfig(**{**config, **({'window': args.window} if args.window else {})})
        torch.manual_seed(0)
        models = {'ours': LoopedTransformer(cfg).to(device), 'torch': TorchLayerLoop(cfg).to(device)}
        steps = {k: torch.compile(m.step) if args.compile else m.step for k, m in models.items()}
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
        y = torch.randint(0, cfg.n_classes, (batch, cfg.block_size), device=device)
        times = {'ours': [], 'torch': []}
        for _ in range(args.rounds):
            for k in times:
                times[k].append(time_train_steps(models[k], x, y, cfg.n_iters, args.repeats, ctx, steps[k]))
        ratio = statistics.median(a / b for a, b in zip(times['ours'], times['torch']))
        ours, theirs = (1e3 * statistics.median(times[k]) for k in ('ours', 'torch'))
        print(f"{name:>8} | {ours:8.2f} | {theirs:14.2f} | {ratio:16.3f}")


# ----------------------------------------------------------------------------------------- chess

def bench_chess(args):
    """Generate fresh puzzles of each mate depth (the training side's stream from seed 0, no file
    or cache) and time it: candidates, exact search and all."""
    counts = {1: 100, 2: 40, 3: 10}    # puzzles per depth: one to two minutes in all
    print(f"{'depth':>5} | {'workers':>7} | {'puzzles':>7} | {'seeds':>6} | {'seconds':>7} | {'puzzles/s':>9}")
    for depth, count in counts.items():
        for workers in (1, 2):
            t0 = time.time()
            puzzles = tasks.generate_puzzles({(depth, 'train'): count}, workers=workers)[(depth, 'train')]
            dt = time.time() - t0
            seeds = puzzles[-1]['seed'] + 1
            print(f"{depth:>5} | {workers:>7} | {count:>7} | {seeds:>6} | {dt:7.1f} | {count / dt:9.2f}")


BENCHMARKS = {'step': bench_step, 'sudoku': bench_sudoku, 'chess': bench_chess}


@dataclass
class BenchConfig:
    device: str = 'auto'                # step: auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = 'float32'              # step: autocast dtype, float32 | bfloat16
    compile: bool = False               # step: torch.compile the loop body of both models
    configs: str = 'readme,long,large'  # step: comma list of readme, long, large, chess
    window: int = 0                     # step: attention window for both models (0 = full)
    rounds: int = 5                     # step: alternating rounds
    repeats: int = 5                    # step: timed steps per round (after 2 warm-up steps)

    def validate(self):
        check_types(self)
        for name, lo, hi in (('window', 0, 2**20), ('rounds', 1, 1000), ('repeats', 1, 1000)):
            check_range(self, name, lo, hi)
        pick_device(self.device)
        check_choice(self, 'dtype', ('float32', 'bfloat16'))
        unknown = [c for c in self.configs.split(',') if c not in STEP_CONFIGS]
        if unknown:
            raise ValueError(f"unknown step config {unknown[0]!r}; choose from {', '.join(STEP_CONFIGS)}")
        return self


def parse_args(argv=None):
    """(benchmark name, BenchConfig) from the command line, or a one-line error."""
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('name', help=f"one of: {', '.join(BENCHMARKS)}")
    add_fields(p, BenchConfig, 'options')
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    name = args.pop('name')
    if name not in BENCHMARKS:
        raise SystemExit(f"bench.py: error: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    try:
        return name, BenchConfig(**args).validate()
    except ValueError as err:
        raise SystemExit(f"bench.py: error: {err}")


if __name__ == '__main__':
    name, args = parse_args()
    try:
        BENCHMARKS[name](args)
    except KeyboardInterrupt:
        print("bench.py: interrupted", file=sys.stderr)
        raise SystemExit(130)
