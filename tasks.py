"""
The paper's three tasks, each easy to train on and harder to test on:

    prefix_sums  bits x_1..x_L -> y_i = (x_1 + ... + x_i) mod 2; difficulty = length L
    sudoku       81 cells -> the solution; difficulty = a named tier (how much search it needs)
    chess        64 squares -> the first move of a forced mate; difficulty = mate depth N

Every task has the same small shape, which train.py and analyze.py rely on:

    task.model_defaults(diff)      LoopedConfig fields the task sets (vocab, classes, positions ...)
    task.train_difficulty          what training draws from; task.eval_difficulties: what it is tested on
    task.eval_mults                test-time iterations for the final table, as multiples of n_iters
    task.parse_difficulty(s)       a difficulty from its command-line spelling (ValueError if unknown)
    task.train_batch(diff, n, gen) -> x (n, L) long, y (n, L) long; drawn from a torch.Generator
    task.eval_set(diff, n, seed)   -> dict with x, y (and whatever score() needs), fixed by the seed
    task.score(logits, split)      -> dict of accuracies in [0, 1]; task.headline names the main one
Targets use -100 for positions that carry no label (ignored by the loss).
"""

import hashlib
import math
import multiprocessing
import os
import time
import zlib

import numpy as np
import torch

CACHE_DIR = os.environ.get('LOOPED_CACHE', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data'))


class TaskError(ValueError):
    """Bad task input (unknown task or difficulty, impossible sizes); its message is one line."""


# ----------------------------------------------------------------------------- shared helpers

def token_scores(logits, y, solved=None):
    """Per-token accuracy over labelled positions and whole-sequence (exact) accuracy.
    logits (N, L, C), y (N, L) with -100 unlabelled; `solved` (N,) overrides the exact check."""
    pred = logits.argmax(-1)
    labelled = y != -100
    right = (pred == y) & labelled
    exact = (right | ~labelled).all(dim=1) if solved is None else solved
    return {'token': right.sum().item() / max(labelled.sum().item(), 1), 'exact': exact.float().mean().item()}


def _digest(payload):
    """sha256 of a cache payload (tensors, strings, numbers, nested lists/dicts) in a fixed order."""
    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, torch.Tensor):
            h.update(str((v.dtype, tuple(v.shape))).encode())
            h.update(v.contiguous().numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(str(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f'[{len(v)}'.encode())
            for item in v:
                feed(item)
        else:
            h.update(repr(v).encode())
    feed(payload)
    return h.hexdigest()


def cached(name, version, params, build, cache_dir=None, verbose=True):
    """Return build() through a versioned on-disk cache file. The file records the version, the
    params that produced it, and a checksum of its payload; a file that fails any check (stale,
    corrupt, edited) is rebuilt, never used. Writes are atomic (temp file + rename)."""
    cache_dir = cache_dir or CACHE_DIR
    tag = '_'.join(f'{k}{v}' for k, v in sorted(params.items()))
    path = os.path.join(cache_dir, f'{name}_v{version}_{tag}.pt')
    why = None
    if os.path.exists(path):
        try:
            blob = torch.load(path, weights_only=True)
            if blob.get('version') != version or blob.get('params') != params:
                why = 'stale'
            elif blob.get('sha256') != _digest(blob.get('payload')):
                why = 'checksum mismatch'
            else:
                return blob['payload']
        except Exception as err:
            why = f'unreadable ({type(err).__name__})'
        if verbose:
            print(f"cache {path} is {why}; regenerating")
    payload = build()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save({'version': version, 'params': params, 'sha256': _digest(payload), 'payload': payload}, tmp)
    os.replace(tmp, path)
    return payload


# ----------------------------------------------------------------------------- prefix sums

class PrefixSums:
    """Bits in (token id = bit), prefix parity out (class c at position i = parity of bits 1..i).
    Difficulty is the length. Causal attention with rotary positions, so any length can be fed,
    and the loop runs longer on longer strings (cfg.scale_iters)."""
    name = 'prefix_sums'
    train_difficulty = 32
    eval_difficulties = (32, 64, 128, 256, 512)
    eval_mults = (0.5, 1, 2, 4, 8, 16)      # test-time iterations in the final table, as multiples of n_iters

    def model_defaults(self, length):
        return dict(vocab_size=2, n_classes=2, block_size=length, pos='rope', causal=True, scale_iters=True)
    headline = 'exact'

    def parse_difficulty(self, s):
        try:
            length = int(s)
        except ValueError:
            raise TaskError(f"prefix_sums difficulty is a string length, got {s!r}")
        if not 1 <= length <= 65536:
            raise TaskError(f"prefix_sums length must be in [1, 65536], got {length}")
        return length

    @staticmethod
    def make(bits):  # bits (n, L) long -> x, y
        return bits, torch.cumsum(bits, dim=1) % 2

    def train_batch(self, length, n, gen):
        return self.make(torch.randint(0, 2, (n, length), generator=gen))

    def eval_set(self, length, n, seed):
        gen = torch.Generator().manual_seed(1_000_003 * seed + length)  # disjoint from training streams
        x, y = self.make(torch.randint(0, 2, (n, length), generator=gen))
        return {'x': x, 'y': y}

    def score(self, logits, split):
        return token_scores(logits, split['y'])


# ----------------------------------------------------------------------------- sudoku
# A grid is 81 digits row-major, 0 for a blank. The solver keeps one candidate bitmask per cell
# (bit d-1 set: digit d still possible) and propagates naked singles (a settled cell removes its
# digit from its row, column and box) and hidden singles (a digit with one place left in a unit
# goes there), then branches on the cell with fewest candidates (lowest index on ties).

ALL_DIGITS = 0x1FF
POPCOUNT = [bin(m).count('1') for m in range(512)]
DIGIT_BITS = [[1 << d for d in range(9) if m >> d & 1] for m in range(512)]
UNITS = ([[r * 9 + c for c in range(9)] for r in range(9)] + [[r * 9 + c for r in range(9)] for c in range(9)] +
         [[(b // 3 * 3 + i // 3) * 9 + b % 3 * 3 + i % 3 for i in range(9)] for b in range(9)])  # rows, columns, boxes
CELL_UNITS = [[u for u in range(27) if i in UNITS[u]] for i in range(81)]
NODE_BUDGET = 2000       # search nodes per solve; a puzzle that needs more is discarded
MAX_ATTEMPTS = 200       # fresh grids per puzzle before a tier is declared unreachable
SUDOKU_VERSION = 1       # bump when generation changes: cached pools are rebuilt
TRAIN_SEED = 0           # training pools; evaluation pools use the run's seed (and the other grid class)

# tier: (clue target range, guesses range). Clues are removed in random order while the solution
# stays unique, stopping at a target drawn from the range, or when no clue can be removed (a target
# of 17, the fewest any uniquely solvable sudoku has, makes minimal puzzles). A puzzle is kept when
# its rating (guesses, see sudoku_search) lies in the range; otherwise a fresh grid is tried.
SUDOKU_TIERS = {
    'easy':   ((36, 45), (0, 0)),          # singles alone solve it, many clues
    'medium': ((27, 35), (0, 0)),          # singles alone, fewer clues: longer chains of deductions
    'tough':  ((17, 17), (0, 0)),          # minimal, still singles alone
    'hard':   ((17, 17), (1, 2)),          # minimal, needs one or two guesses
    'expert': ((17, 17), (3, math.inf)),   # minimal, needs several guesses
}


class OverBudget(Exception):
    pass


def propagate(c, start=range(27)):
    """Naked and hidden singles on c (81 candidate masks, changed in place) until nothing changes.
    Returns False on a contradiction (a cell or a digit with no place left, a digit twice in a unit).
    Units are examined from `start`, and again only after one of their cells changed (the fixpoint
    is the same in any order)."""
    todo = list(start)                                  # units to examine
    queued = [u in todo for u in range(27)]
    while todo:
        u = todo.pop()
        queued[u], unit = False, UNITS[u]
        fixed = 0                                       # digits settled in this unit
        for i in unit:
            m = c[i]
            if m & (m - 1) == 0:
                if m == 0 or m & fixed:
                    return False
                fixed |= m
        if fixed == ALL_DIGITS:
            continue
        changed, once, twice = [], 0, 0                 # once / twice: digits possible in >= 1 / >= 2 cells
        for i in unit:
            m = c[i]
            if m & (m - 1):
                if m & fixed:                           # naked single: settled digits leave the other cells
                    m &= ~fixed
                    c[i] = m
                    changed.append(i)
                twice |= once & m
            once |= m
        if once != ALL_DIGITS:
            return False
        hidden = once & ~twice & ~fixed                 # hidden single: a digit with one place left
        for i in unit:
            m = c[i] & hidden
            if m:
                if m & (m - 1):
                    return False
                c[i] = m
                changed.append(i)
        for i in changed:
            for v in CELL_UNITS[i]:
                if not queued[v]:
                    queued[v] = True
                    todo.append(v)
    return True


def sudoku_search(grid, limit=2, budget=NODE_BUDGET, rng=None):
    """Depth-first search with singles propagation. Returns (solutions, guesses): up to `limit`
    solution grids, and the number of branching nodes visited. For a unique puzzle (limit 2) the
    whole tree is searched, so guesses is a reproducible rating: 0 = singles alone solve it.
    rng shuffles the digits tried at a branch (to draw random grids). Raises OverBudget."""
    solutions, nodes, guesses = [], 0, 0

    def dfs(c, start=range(27)):
        nonlocal nodes, guesses
        nodes += 1
        if nodes > budget:
            raise OverBudget
        if not propagate(c, start):
            return
        best, fewest = -1, 10
        for i in range(81):
            k = POPCOUNT[c[i]]
            if 1 < k < fewest:
                best, fewest = i, k
                if k == 2:
                    break
        if best < 0:
            solutions.append([m.bit_length() for m in c])
            return
        guesses += 1
        digits = DIGIT_BITS[c[best]]
        for j in (rng.permutation(len(digits)) if rng is not None else range(len(digits))):
            if len(solutions) >= limit:
                return
            child = c.copy()
            child[best] = digits[j]
            dfs(child, CELL_UNITS[best])               # the parent was a fixpoint: only best's units can change

    dfs([ALL_DIGITS if v == 0 else 1 << (v - 1) for v in grid])
    return solutions, guesses


def grid_class(solution):
    """0 or 1, the same for every transform of a solution grid (so for every transform of any
    puzzle on it): training pools use class-0 grids only, evaluation pools class-1 grids only.
    Equivalent puzzles have equivalent solutions, so train and test can never share a puzzle or a
    transform of one, whatever the tiers, seeds and pool sizes, and no pool needs the others to be
    built. The price is half the random grids, which are cheap next to clue removal.
    The invariant: for every pair of rows, the cycle type of the column permutation taking one row
    to the other (the column where each digit sits in one row -> where it sits in the other),
    as a sorted list over pairs; the same for columns; the two lists sorted. Line permutations
    conjugate or invert these permutations, relabeling digits leaves them alone, transposing
    swaps the two lists; a hash of the whole turns the rich invariant into one bit."""
    g = np.asarray(solution).reshape(9, 9)

    def pair_cycles(lines):
        where = np.argsort(lines, axis=1)               # where[r, d-1] = column of digit d in line r
        types = []
        for a in range(9):
            for b in range(a + 1, 9):
                perm, seen, cycles = where[b][lines[a] - 1], [False] * 9, []
                for s in range(9):
                    k = 0
                    while not seen[s]:
                        seen[s], s, k = True, perm[s], k + 1
                    if k:
                        cycles.append(k)
                types.append(tuple(sorted(cycles)))
        return sorted(types)
    return zlib.crc32(repr(sorted([pair_cycles(g), pair_cycles(g.T)])).encode()) & 1


def random_grid(rng):
    """A random complete grid: the three diagonal boxes don't constrain each other, so fill them
    with random permutations, then let the search (digits in random order) complete the rest."""
    grid = [0] * 81
    for box in (18, 22, 26):
        for cell, digit in zip(UNITS[box], rng.permutation(9) + 1):
            grid[cell] = int(digit)
    solutions = sudoku_search(grid, limit=1, rng=rng)[0]
    return solutions[0] if solutions else None


def make_puzzle(job):
    """One puzzle of a tier from its own seed (so pools don't depend on the number of workers).
    job = (clues range, guesses range, grid class, seed entropy) -> (puzzle, solution, guesses)."""
    (lo, hi), (glo, ghi), want_class, entropy = job
    rng = np.random.default_rng(entropy)
    for _ in range(MAX_ATTEMPTS):
        try:
            solution = random_grid(rng)
            if solution is None or grid_class(solution) != want_class:
                continue
            puzzle, clues, target = list(solution), 81, rng.integers(lo, hi + 1)
            for i in rng.permutation(81):
                if clues <= target:
                    break
                puzzle[i] = 0
                if len(sudoku_search(puzzle)[0]) == 1:
                    clues -= 1
                else:
                    puzzle[i] = solution[i]
            guesses = sudoku_search(puzzle)[1]
        except OverBudget:                              # discard the attempt, never keep an unchecked puzzle
            continue
        if glo <= guesses <= ghi:
            return puzzle, solution, guesses
    raise TaskError(f"no puzzle with {glo}..{ghi} guesses in {MAX_ATTEMPTS} attempts; is the tier reachable?")


def sudoku_tier(name):
    """(clues range, guesses range) of a tier, checked."""
    if name not in SUDOKU_TIERS:
        raise TaskError(f"unknown sudoku tier {name!r}; choose one of {', '.join(SUDOKU_TIERS)}")
    (lo, hi), (glo, ghi) = SUDOKU_TIERS[name]
    if not 17 <= lo <= hi <= 81 or not 0 <= glo <= ghi:
        raise TaskError(f"sudoku tier {name!r} asks for {lo}..{hi} clues and {glo}..{ghi} guesses; "
                        f"need 17 <= clues <= 81 and 0 <= guesses")
    return (lo, hi), (glo, ghi)


def generate_sudoku(tier, split, n, seed, workers=1, verbose=True):
    """n puzzles of a tier for split 'train' or 'test', in worker processes. Returns a dict of
    tensors: puzzles, solutions (n, 81) int8 and guesses (n,) int32."""
    clues, guesses = sudoku_tier(tier)
    if n < 1:
        raise TaskError(f"a sudoku pool needs at least 1 puzzle, got {n}")
    if split not in ('train', 'test'):
        raise TaskError(f"a sudoku pool is for 'train' or 'test', got {split!r}")
    tag = [zlib.crc32(tier.encode()), zlib.crc32(split.encode()), seed % 2 ** 63]
    jobs = [(clues, guesses, int(split == 'test'), tag + [i]) for i in range(n)]
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    results, t0, shown = [], time.time(), time.time()
    try:
        for result in (pool.imap(make_puzzle, jobs, chunksize=4) if pool else map(make_puzzle, jobs)):
            results.append(result)
            if verbose and (time.time() - shown > 5 or len(results) == n):   # a line every 5 seconds, and at the end
                shown = time.time()
                print(f"sudoku {split} pool {tier}: {len(results)}/{n} puzzles, {shown - t0:.0f}s, {workers} workers", flush=True)
    finally:
        if pool:
            pool.terminate()
    puzzles, solutions, ratings = zip(*results)
    return {'puzzles': torch.tensor(puzzles, dtype=torch.int8), 'solutions': torch.tensor(solutions, dtype=torch.int8),
            'guesses': torch.tensor(ratings, dtype=torch.int32)}


def sudoku_pool(tier, split, n, seed, workers=None, cache_dir=None, verbose=True):
    """generate_sudoku through the on-disk cache: one file per tier, split, size and seed."""
    (lo, hi), (glo, ghi) = sudoku_tier(tier)
    workers = workers or ((os.cpu_count() or 1) if n >= 64 else 1)
    params = {'tier': tier, 'split': split, 'n': n, 'seed': seed, 'clues': f'{lo}-{hi}', 'guesses': f'{glo}-{ghi}'}
    pool = cached('sudoku', SUDOKU_VERSION, params, lambda: generate_sudoku(tier, split, n, seed, workers, verbose),
                  cache_dir, verbose)
    return {k: v.numpy() for k, v in pool.items()}


def augment_sudoku(puzzles, solutions, rng):
    """Random validity-preserving transforms of a batch, the same one for a puzzle and its solution:
    digit relabeling, band and stack permutations, row (column) permutations within each band
    (stack), transpose. puzzles, solutions (n, 81) int arrays; rng a numpy Generator."""
    n = len(puzzles)

    def line_order():                                   # (n, 9): new line i reads old line order[i]
        bands = rng.random((n, 3)).argsort(1)
        within = rng.random((n, 3, 3)).argsort(2)
        return (3 * bands[:, :, None] + within).reshape(n, 9)
    src = line_order()[:, :, None] * 9 + line_order()[:, None, :]  # (n, 9, 9): cell (r, c) reads this cell
    flip = rng.random(n) < 0.5
    src[flip] = src[flip].transpose(0, 2, 1)
    src = src.reshape(n, 81)
    relabel = np.concatenate([np.zeros((n, 1), np.int64), rng.random((n, 9)).argsort(1) + 1], 1)  # (n, 10); blank stays 0
    move = lambda g: np.take_along_axis(relabel, np.take_along_axis(g.astype(np.int64), src, 1), 1)
    return move(puzzles), move(solutions)


def sudoku_valid(grids):
    """(N, 81) digits -> (N,) bool: every row, column and box holds 1..9 once."""
    units = grids[:, torch.tensor(UNITS)]               # (N, 27, 9)
    return (units.sort(-1).values == torch.arange(1, 10)).all(-1).all(-1)


class Sudoku:
    """81 tokens row-major: 0 for a blank, 1-9 for a given digit. Every cell is labelled with its
    solution digit (class c = digit c+1), givens too (the model copies them). Difficulty is a named
    tier (SUDOKU_TIERS); training draws augmented transforms of a fixed pool of base puzzles."""
    name = 'sudoku'
    train_difficulty = 'easy'
    eval_difficulties = tuple(SUDOKU_TIERS)
    eval_mults = (0.5, 1, 2, 4, 8)
    headline = 'exact'

    def __init__(self, cache_dir=None):
        self.cache_dir, self.pools = cache_dir, {}
        for tier in SUDOKU_TIERS:                       # an impossible tier fails here, not mid-run
            sudoku_tier(tier)
        size = os.environ.get('LOOPED_SUDOKU_POOL', '5000')   # base puzzles in a training pool
        if not size.isdigit() or int(size) < 1:
            raise TaskError(f"LOOPED_SUDOKU_POOL must be a positive integer, got {size!r}")
        self.pool_size = int(size)

    def model_defaults(self, tier):
        # easy puzzles need about 5 (at most 10) rounds of parallel singles, medium 9 (20), tough 16 (28):
        # 16 iterations cover the training tier, harder tiers need more at test time. d_model 64 keeps a
        # CPU step near a second (batch 32); on a GPU, raise d_model and batch_size.
        return dict(vocab_size=10, n_classes=9, block_size=81, pos='learned', causal=False, scale_iters=False,
                    d_model=64, n_head=4, n_iters=16)

    def parse_difficulty(self, s):
        sudoku_tier(s)
        return s

    def train_batch(self, tier, n, gen):
        if tier not in self.pools:
            self.pools[tier] = sudoku_pool(tier, 'train', self.pool_size, TRAIN_SEED, cache_dir=self.cache_dir)
        pool = self.pools[tier]
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        pick = rng.integers(0, len(pool['puzzles']), n)
        x, y = augment_sudoku(pool['puzzles'][pick], pool['solutions'][pick], rng)
        return torch.from_numpy(x), torch.from_numpy(y - 1)

    def eval_set(self, tier, n, seed):
        pool = sudoku_pool(tier, 'test', n, seed, cache_dir=self.cache_dir)
        x = torch.from_numpy(pool['puzzles']).long()
        return {'x': x, 'y': torch.from_numpy(pool['solutions']).long() - 1,
                'guesses': torch.from_numpy(pool['guesses']), 'clues': (x > 0).sum(1)}

    def score(self, logits, split):
        """cell: accuracy on blank cells; exact: the predicted grid is a valid sudoku that keeps every
        given (any such grid is the solution, since every puzzle has exactly one)."""
        x, pred = split['x'], logits.argmax(-1) + 1     # (N, 81) digits
        solved = sudoku_valid(pred) & ((x == 0) | (pred == x)).all(1)
        s = token_scores(logits, torch.where(x == 0, split['y'], -100), solved)
        return {'cell': s['token'], 'exact': s['exact']}


# ----------------------------------------------------------------------------- registry

TASKS = {'prefix_sums': PrefixSums, 'sudoku': Sudoku}


def get_task(name):
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()
