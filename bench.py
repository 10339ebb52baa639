"""
Benchmarks of the data pipelines, measured rather than asserted in tests:

    python bench.py sudoku      # augmented training puzzles/s, base puzzles/s per tier (1 and 2 workers)

A benchmark is a function bench_<name>() printing a small table; add it to BENCHMARKS at the bottom.
"""

import argparse
import tempfile
import time

import torch

import tasks


def per_second(fn, items, min_seconds=1.0):
    """items processed per second by repeated calls of fn() (each handling `items`), over at least min_seconds."""
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    return calls * items / (time.perf_counter() - t0)


def bench_sudoku():
    # (a) training batches: augmented transforms of base puzzles drawn from a training pool
    with tempfile.TemporaryDirectory() as cache_dir:
        task = tasks.Sudoku(cache_dir=cache_dir)
        task.pool_size = 200
        task.train_batch('easy', 1, torch.Generator())    # builds the pool (not timed)
        gen = torch.Generator().manual_seed(0)
        print(f"\n{'train_batch':>12} | {'puzzles/s':>10}")
        for batch in (64, 1024):
            rate = per_second(lambda: task.train_batch('easy', batch, gen), batch)
            print(f"{'batch ' + str(batch):>12} | {rate:10.0f}")

    # (b) base puzzles per tier, generated from scratch (no cache), in 1 and 2 worker processes
    sizes = {'easy': 100, 'medium': 100, 'tough': 24, 'hard': 24, 'expert': 16}
    print(f"\n{'tier':>8} | {'puzzles':>7} | {'1 worker /s':>11} | {'2 workers /s':>12} | {'clues':>5} | {'guesses':>7}")
    for tier, n in sizes.items():
        rates = []
        for workers in (1, 2):
            t0 = time.perf_counter()
            pool = tasks.generate_sudoku(tier, 'test', n, 0, workers=workers, verbose=False)
            rates.append(n / (time.perf_counter() - t0))
        clues = (pool['puzzles'] > 0).sum(1).float().mean()
        guesses = pool['guesses'].float().mean()
        print(f"{tier:>8} | {n:7d} | {rates[0]:11.1f} | {rates[1]:12.1f} | {clues:5.1f} | {guesses:7.2f}")


BENCHMARKS = {'sudoku': bench_sudoku}

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name', help=f"one of: {', '.join(BENCHMARKS)}")
    name = parser.parse_args().name
    if name not in BENCHMARKS:
        raise SystemExit(f"bench.py: error: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    BENCHMARKS[name]()
