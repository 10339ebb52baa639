"""
Benchmarks, one function per thing measured:

    python bench.py chess        # verified mate-in-N puzzles per second, per depth, 1 and 2 worker processes

Speed is measured here, never asserted in tests.
"""

import argparse
import time

import tasks


def bench_chess():
    """Generate fresh puzzles of each mate depth (the training side's stream from seed 0, no file
    or cache) and time it: candidates, exact search and all."""
    counts = {1: 100, 2: 40, 3: 10}    # puzzles per depth: one to two minutes in all
    print(f"{'depth':>5} | {'workers':>7} | {'puzzles':>7} | {'seeds':>6} | {'seconds':>7} | {'puzzles/s':>9}")
    for depth, count in counts.items():
        for workers in (1, 2):
            t0 = time.time()
            puzzles = tasks.generate_puzzles({(depth, 'train'): count}, workers=workers)[(depth, 'train')]
            dt = time.time() - t0
            print(f"{depth:>5} | {workers:>7} | {count:>7} | {puzzles[-1]['seed'] + 1:>6} | {dt:7.1f} | {count / dt:9.2f}")


BENCHMARKS = {'chess': bench_chess}

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name', help=f"one of: {', '.join(BENCHMARKS)}")
    name = parser.parse_args().name
    if name not in BENCHMARKS:
        raise SystemExit(f"bench.py: error: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    BENCHMARKS[name]()
