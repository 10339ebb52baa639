"""
The paper's three tasks, each easy to train on and harder to test on:

    prefix_sums  bits x_1..x_L -> y_i = (x_1 + ... + x_i) mod 2; difficulty = length L
    sudoku       81 cells -> the solution; difficulty = a named tier (how much search it needs)
    chess        64 squares -> the first move of a forced mate; difficulty = mate depth N

Every task has the same small shape, which train.py and analyze.py rely on:

    task.name, task.headline        the task's name; the key of score() that is the main accuracy
    task.model_defaults(difficulty) LoopedConfig fields the task sets (vocab, classes, positions ...)
    task.train_defaults             TrainConfig fields the task sets (a dict, often empty)
    task.train_difficulty           what training draws from; task.eval_difficulties: what it is tested on
    task.eval_mults                 test-time iterations for the final table, as multiples of the default rule
    task.parse_difficulty(s)        a difficulty from its command-line spelling (TaskError if unknown)
    task.train_batch(difficulty, n, gen) -> x (n, L) long, y (n, L) long; drawn from a torch.Generator
    task.eval_set(difficulty, n, seed)   -> dict with x, y (and whatever score() needs), fixed by the seed
    task.score(logits, split)       -> dict of accuracies in [0, 1]
    task.loss(logits, y)            optional: the training loss (default: cross-entropy per token)

Targets use -100 for positions that carry no label (ignored by the loss). A target shaped like the
logits marks one choice per example instead (see choice_loss). Sudoku and chess data come from the
offline generators at the bottom of this file, through an on-disk cache (CACHE_DIR, env LOOPED_CACHE).
"""

import hashlib
import itertools
import math
import multiprocessing
import os
import random
import re
import signal
import sys
import time
import zlib

import chess
import numpy as np
import torch
import torch.nn.functional as F

from looped import one_line

CACHE_DIR = os.environ.get('LOOPED_CACHE', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data'))


class TaskError(ValueError):
    """Bad task input (unknown task or difficulty, impossible sizes); its message is one line."""


# ----------------------------------------------------------------------------- shared helpers

def token_scores(logits, y, solved=None):
    """Per-token accuracy over labelled positions and whole-sequence (exact) accuracy.
    logits (N, L, C), y (N, L) with -100 unlabelled; `solved` (N,) bool overrides the exact check.
    With y shaped like logits (one choice per example, see choice_loss) both are the choice's accuracy."""
    if y.shape == logits.shape:
        pred = logits.flatten(1).masked_fill(y.flatten(1) == -100, float('-inf')).argmax(1)    # (N,)
        right = (y.flatten(1).gather(1, pred[:, None])[:, 0] == 1).float().mean().item()
        return {'token': right, 'exact': right}
    pred = logits.argmax(-1)
    labelled = y != -100
    right = (pred == y) & labelled
    exact = (right | ~labelled).all(dim=1) if solved is None else solved
    return {'token': right.sum().item() / max(labelled.sum().item(), 1), 'exact': exact.float().mean().item()}


def choice_loss(logits, y):
    """Cross-entropy of one choice per example, a softmax over the entries it allows: logits and y of
    one shape (N, ...), y 1 on the answer, 0 on the other allowed entries, -100 on entries not allowed
    (they get no probability). Chess: the legal moves of a position."""
    scores = logits.flatten(1).float().masked_fill(y.flatten(1) == -100, float('-inf'))  # (N, K)
    return F.cross_entropy(scores, y.flatten(1).argmax(1))


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
    """build() through the on-disk cache file {name}_v{version}_{params}.pt, which records the version,
    the params and a checksum of the payload; a file that fails any check is rebuilt. Writes are atomic."""
    cache_dir = cache_dir or CACHE_DIR
    tag = '_'.join(f'{k}{v}' for k, v in sorted(params.items()))
    path = os.path.join(cache_dir, f'{name}_v{version}_{tag}.pt')
    try:                                                # an unusable cache fails before the build
        os.makedirs(cache_dir, exist_ok=True)
        if os.path.isdir(path):
            raise IsADirectoryError(21, 'is a directory, not a cache file', path)
    except OSError as err:
        raise TaskError(f"cannot use the data cache {err.filename or cache_dir}: {err.strerror} "
                        f"(set LOOPED_CACHE to a writable folder)")
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
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        torch.save({'version': version, 'params': params, 'sha256': _digest(payload), 'payload': payload}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:             # disk full, folder gone: return the data uncached
        if os.path.exists(tmp):
            os.remove(tmp)
        print(f"cache {path} not written ({one_line(err)}); continuing without it")
    return payload


# ----------------------------------------------------------------------------- prefix sums

class PrefixSums:
    """Bits in (token = bit), prefix parities out (class at position i = parity of bits 1..i); difficulty =
    length L. The model reads a start token, attends causally to the previous position only (window 2,
    rotary positions) and runs 2.5 iterations per bit at every length (scale_iters)."""
    name = 'prefix_sums'
    train_difficulty = 16
    eval_difficulties = (16, 32, 64, 128)          # 256 and 512: --eval_difficulties 16,32,64,128,256,512
    eval_mults = (0.5, 1, 2)
    headline = 'exact'
    train_defaults = dict(alpha=0.0, tbptt=3, max_steps=1500)

    def model_defaults(self, length):
        return dict(vocab_size=2, n_classes=2, block_size=length, pos='rope', causal=True, window=2, bos=True,
                    n_iters=math.ceil(2.5 * length), scale_iters=True)

    def parse_difficulty(self, s):
        try:
            length = int(s)
        except ValueError:
            raise TaskError(f"prefix_sums difficulty is a string length, got {s!r}")
        if not 1 <= length <= 65536:
            raise TaskError(f"prefix_sums length must be in [1, 65536], got {length}")
        return length

    @staticmethod
    def make(bits):
        """bits (n, L) long -> x = bits, y (n, L) long prefix parities."""
        return bits, torch.cumsum(bits, dim=1) % 2

    def train_batch(self, length, n, gen):
        """n strings of one random length in [2, length] -> x, y (n, that length) long."""
        length = int(torch.randint(min(2, length), length + 1, (1,), generator=gen))
        return self.make(torch.randint(0, 2, (n, length), generator=gen))

    def eval_set(self, length, n, seed):
        gen = torch.Generator().manual_seed((1_000_003 * seed + length) % 2 ** 64)  # apart from training streams
        x, y = self.make(torch.randint(0, 2, (n, length), generator=gen))
        return {'x': x, 'y': y}

    def score(self, logits, split):
        return token_scores(logits, split['y'])


# ----------------------------------------------------------------------------- sudoku

# A tier is ('rounds', lo, hi): puzzles that singles finish in lo..hi rounds (singles_rounds), or
# ('guesses', lo, hi): minimal puzzles that singles cannot finish, whose search makes lo..hi guesses.
SUDOKU_TIERS = {
    'r1-4':   ('rounds', 1, 4),            # the training tier
    'r5-8':   ('rounds', 5, 8),
    'r9-16':  ('rounds', 9, 16),
    'r17+':   ('rounds', 17, math.inf),
    'g1-2':   ('guesses', 1, 2),
    'g3+':    ('guesses', 3, math.inf),
}
SUDOKU_VERSION = 2       # part of the cache key: bump when generation changes
TRAIN_SEED = 0           # seed of the training pools; test pools use the run's seed


class Sudoku:
    """81 cells row-major in (0 blank, 1-9 a given), the solution out (class c = digit c+1, givens too);
    difficulty = a tier of SUDOKU_TIERS. Training draws augmented transforms of pool_size base puzzles
    (env LOOPED_SUDOKU_POOL). The model attends along the constraint graph and iterates until it halts."""
    name = 'sudoku'
    train_difficulty = 'r1-4'
    eval_difficulties = tuple(SUDOKU_TIERS)
    eval_mults = (1, 2, 4, 8)
    headline = 'exact'
    train_defaults = dict(alpha=0.0, tbptt=8, lr=3e-3, batch_size=32, max_steps=2000, warmup_steps=100, eval_n=256)

    def __init__(self, cache_dir=None):
        self.cache_dir, self.pools = cache_dir, {}
        for tier in SUDOKU_TIERS:                       # an impossible tier fails here, not mid-run
            sudoku_tier(tier)
        size = os.environ.get('LOOPED_SUDOKU_POOL', '5000')
        if not size.isdigit() or int(size) < 1:
            raise TaskError(f"LOOPED_SUDOKU_POOL must be a positive integer, got {size!r}")
        self.pool_size = int(size)

    def model_defaults(self, tier):
        return dict(vocab_size=10, n_classes=9, block_size=81, pos='learned', causal=False, scale_iters=False,
                    graph='sudoku', recall='internal', d_model=64, n_head=4, n_iters=16, halt_tol=1e-3)

    def parse_difficulty(self, s):
        sudoku_tier(s)
        return s

    def train_batch(self, tier, n, gen):
        """-> x (n, 81) long digits, y (n, 81) long classes: augmented transforms of pool puzzles."""
        if tier not in self.pools:
            self.pools[tier] = sudoku_pool(tier, 'train', self.pool_size, TRAIN_SEED, cache_dir=self.cache_dir)
        pool = self.pools[tier]
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        pick = rng.integers(0, len(pool['puzzles']), n)
        x, y = augment_sudoku(pool['puzzles'][pick], pool['solutions'][pick], rng)
        return torch.from_numpy(x), torch.from_numpy(y - 1)

    def eval_set(self, tier, n, seed):
        """x, y (n, 81) long, rounds and guesses (n,) (see make_puzzle), clues (n,): the givens."""
        pool = sudoku_pool(tier, 'test', n, seed, cache_dir=self.cache_dir)
        x = torch.from_numpy(pool['puzzles']).long()
        return {'x': x, 'y': torch.from_numpy(pool['solutions']).long() - 1, 'rounds': torch.from_numpy(pool['rounds']),
                'guesses': torch.from_numpy(pool['guesses']), 'clues': (x > 0).sum(1)}

    def score(self, logits, split):
        """cell: accuracy on blank cells; exact: the predicted grid is a valid sudoku that keeps every
        given (then it is the solution: every puzzle has exactly one)."""
        x, pred = split['x'], logits.argmax(-1) + 1     # (N, 81) digits
        solved = sudoku_valid(pred) & ((x == 0) | (pred == x)).all(1)
        s = token_scores(logits, torch.where(x == 0, split['y'], -100), solved)
        return {'cell': s['token'], 'exact': s['exact']}


def sudoku_valid(grids):
    """(N, 81) digits -> (N,) bool: every row, column and box holds 1..9 once."""
    units = grids[:, torch.tensor(UNITS)]               # (N, 27, 9)
    return (units.sort(-1).values == torch.arange(1, 10)).all(-1).all(-1)


# ----------------------------------------------------------------------------- chess

CHESS_VERSION = 2             # part of the cache key and the puzzle file header: bump when generation changes
MAX_DEPTH = 3                 # deepest mate the tasks offer
PUZZLE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'puzzles_chess.txt')
FLIP_FILES = [sq ^ 7 for sq in range(64)]   # a <-> h mirror of square indices


class Chess:
    """Mate in N: 64 squares in (encode_board), logits (64, 64) out, a score for every (from, to) move (the
    pair head), trained as one softmax over the legal moves (choice_loss). Difficulty: the mate depth N ('2')
    or a range ('1-2'). Scores: 'move' (legal and mates within N), 'label' (the stored move), and
    'move_playout', 'move_endgame': 'move' on each kind of position."""
    name = 'chess'
    train_difficulty = '1-2'
    eval_difficulties = ('1', '2', '3')
    eval_mults = (0.5, 1, 2, 4)
    headline = 'move'
    train_defaults = dict(batch_size=32, lr=3e-3, warmup_steps=300, max_steps=6000, alpha=0.0, tbptt=8, overrun=True)
    loss = staticmethod(choice_loss)
    train_pool = 8000             # training puzzles per mate depth (each also seen a<->h mirrored)
    test_pool = 512               # test puzzles per mate depth (more if eval_set asks for more)

    def __init__(self):
        self.loaded = {}          # (difficulty, side, count) -> pools()
        self.verdicts = {}        # (fen, move, depth) -> the move forces mate within depth

    def model_defaults(self, difficulty):
        return dict(vocab_size=13, n_classes=64, pair_head=True, block_size=64, pos='learned', causal=False,
                    scale_iters=False, graph='chess_local', board_bias=True, recall='internal', d_model=64, n_head=4,
                    n_iters=16)

    def parse_difficulty(self, s):
        m = re.fullmatch(r'(\d)(?:-(\d))?', str(s))
        if not m or not 1 <= int(m[1]) <= int(m[2] or m[1]) <= MAX_DEPTH:
            raise TaskError(f"chess difficulty is a mate depth in 1..{MAX_DEPTH} or a range like 1-2, got {s!r}")
        return m[1] if int(m[2] or m[1]) == int(m[1]) else f'{m[1]}-{m[2]}'

    def pools(self, difficulty, side, count):
        """The (depth, side) pools of every depth in difficulty, concatenated: x (N, 64), y (N, 64, 64) int8,
        depth (N,), and the lists fen, move, kind."""
        if (difficulty, side, count) not in self.loaded:
            lo, _, hi = difficulty.partition('-')
            pools = {d: chess_pool(d, side, count) for d in range(int(lo), int(hi or lo) + 1)}
            self.loaded[difficulty, side, count] = {
                'x': torch.cat([p['x'] for p in pools.values()]), 'y': torch.cat([p['y'] for p in pools.values()]),
                'depth': torch.tensor([d for d, p in pools.items() for _ in p['fen']]),
                **{k: [v for p in pools.values() for v in p[k]] for k in ('fen', 'move', 'kind')}}
        return self.loaded[difficulty, side, count]

    def train_batch(self, difficulty, n, gen):
        """-> x (n, 64) long, y (n, 64, 64) long; half the batch a <-> h mirrored."""
        pool = self.pools(difficulty, 'train', self.train_pool)
        idx = torch.randint(0, len(pool['x']), (n,), generator=gen)
        flip = torch.randint(0, 2, (n, 1), generator=gen).bool()
        x, y = pool['x'][idx], pool['y'][idx].long()                       # (n, 64), (n, 64, 64)
        return (torch.where(flip, x[:, FLIP_FILES], x),
                torch.where(flip[:, :, None], y[:, FLIP_FILES][:, :, FLIP_FILES], y))

    def eval_set(self, difficulty, n, seed):
        """x (n, 64), y (n, 64, 64) long, depth (n,), and the lists fen, move, kind."""
        pool = self.pools(difficulty, 'test', max(n, self.test_pool))
        idx = torch.randperm(len(pool['x']), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        return {'x': pool['x'][idx], 'y': pool['y'][idx].long(), 'depth': pool['depth'][idx],
                **{k: [pool[k][i] for i in idx] for k in ('fen', 'move', 'kind')}}

    def score(self, logits, split):
        move_ok, label_ok = [], []
        for lg, fen, label, depth in zip(logits, split['fen'], split['move'], split['depth'].tolist()):
            board = load_board(fen)
            move = decode_move(lg, board)
            label_ok.append(move.uci() == label)
            if (fen, move.uci(), depth) not in self.verdicts:
                self.verdicts[fen, move.uci(), depth] = label_ok[-1] or solves(board, move, depth)
            move_ok.append(self.verdicts[fen, move.uci(), depth])
        scores = {'move': sum(move_ok) / len(move_ok), 'label': sum(label_ok) / len(label_ok)}
        for kind in sorted(set(split.get('kind', []))):
            ok = [m for m, k in zip(move_ok, split['kind']) if k == kind]
            scores[f'move_{kind}'] = sum(ok) / len(ok)
        return scores


def _frame(square, board):
    """A square of the board -> its square in the encoded frame (the side to move shown as white)."""
    return square if board.turn == chess.WHITE else chess.square_mirror(square)


def encode_board(board):
    """64 tokens (64,) long, a1=0 .. h8=63, in the frame where the side to move is white (the board is
    mirrored when black moves): 0 empty, 1-6 own P N B R Q K, 7-12 the opponent's."""
    x = torch.zeros(64, dtype=torch.long)
    for square, piece in board.piece_map().items():
        x[_frame(square, board)] = piece.piece_type + (0 if piece.color == board.turn else 6)
    return x


def model_moves(board):
    """The moves the model chooses among: the legal ones, promotions to a queen only."""
    return [m for m in board.legal_moves if m.promotion in (None, chess.QUEEN)]


def encode_move(board, move):
    """Targets (64, 64) long, entry [from, to] in the encoded frame: 1 for `move`, 0 for the other
    moves of model_moves, -100 for the rest (no probability under choice_loss)."""
    y = torch.full((64, 64), -100, dtype=torch.long)
    for m in model_moves(board):
        y[_frame(m.from_square, board), _frame(m.to_square, board)] = 0
    y[_frame(move.from_square, board), _frame(move.to_square, board)] = 1
    return y


def decode_move(logits, board):
    """The legal move of `board` with the highest score logits[from, to], logits (64, 64) in the
    encoded frame: the argmax of choice_loss's softmax. A promotion is read as a queen."""
    if logits.shape != (64, 64):
        raise TaskError(f"chess logits are (64, 64) scores of from x to squares, got {tuple(logits.shape)}")
    moves = model_moves(board)
    if not moves:
        raise TaskError(f"no legal move in {board.fen()!r}")
    scores = logits.float().tolist()
    return max(moves, key=lambda m: scores[_frame(m.from_square, board)][_frame(m.to_square, board)])


def load_board(fen):
    """A chess.Board from a FEN, or TaskError: the position must be legal and carry no castling or
    en passant rights."""
    try:
        board = chess.Board(fen)
    except (ValueError, TypeError) as err:
        raise TaskError(f"illegal FEN {fen!r}: {err}")
    if not board.is_valid():
        raise TaskError(f"illegal position {fen!r} ({board.status()!r})")
    if board.castling_rights or board.has_legal_en_passant():
        raise TaskError(f"position {fen!r} has castling or en passant rights, which puzzles cannot carry")
    return board


# ----------------------------------------------------------------------------- registry

TASKS = {'prefix_sums': PrefixSums, 'sudoku': Sudoku, 'chess': Chess}


def get_task(name):
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()


# ----------------------------------------------------------------------------- offline generators

def worker_pool(workers):
    """A process pool whose workers ignore Ctrl-C (the parent stops them)."""
    return multiprocessing.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))


# Sudoku. A grid is 81 digits row-major, 0 for a blank. The solver keeps one candidate bitmask per
# cell (bit d-1 set: digit d still possible).

ALL_DIGITS = 0x1FF
POPCOUNT = [bin(m).count('1') for m in range(512)]
DIGIT_BITS = [[1 << d for d in range(9) if m >> d & 1] for m in range(512)]
UNITS = ([[r * 9 + c for c in range(9)] for r in range(9)] + [[r * 9 + c for r in range(9)] for c in range(9)] +
         [[(b // 3 * 3 + i // 3) * 9 + b % 3 * 3 + i % 3 for i in range(9)] for b in range(9)])  # rows, columns, boxes
CELL_UNITS = [[u for u in range(27) if i in UNITS[u]] for i in range(81)]
NODE_BUDGET = 2000       # search nodes per solve; a puzzle that needs more is discarded
MAX_ATTEMPTS = 1000      # fresh grids per puzzle before a tier is declared unreachable


class OverBudget(Exception):
    pass


def propagate(c, start=range(27)):
    """Naked singles (a settled cell removes its digit from its units) and hidden singles (a digit with
    one place left in a unit goes there) on c, 81 candidate masks changed in place, until nothing changes.
    Examines the units in `start`, then those of each changed cell. False on a contradiction."""
    todo = list(start)                                  # units to examine
    queued = [u in todo for u in range(27)]
    while todo:
        u = todo.pop()
        queued[u], unit = False, UNITS[u]
        settled = 0                                     # digits settled in this unit
        for i in unit:
            m = c[i]
            if m & (m - 1) == 0:
                if m == 0 or m & settled:
                    return False
                settled |= m
        if settled == ALL_DIGITS:
            continue
        changed, once, twice = [], 0, 0                 # once / twice: digits possible in >= 1 / >= 2 cells
        for i in unit:
            m = c[i]
            if m & (m - 1):
                if m & settled:                         # naked single: settled digits leave the other cells
                    m &= ~settled
                    c[i] = m
                    changed.append(i)
                twice |= once & m
            once |= m
        if once != ALL_DIGITS:
            return False
        hidden = once & ~twice & ~settled               # hidden single: a digit with one place left
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
    """Depth-first search with propagate, branching on the first cell with fewest candidates -> up to `limit`
    solution grids, and guesses: the branching nodes visited (0 if singles solve it). rng shuffles the
    digits tried at a branch. Raises OverBudget after `budget` nodes."""
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
            dfs(child, CELL_UNITS[best])               # only best's units can change

    dfs([ALL_DIGITS if v == 0 else 1 << (v - 1) for v in grid])
    return solutions, guesses


def grid_class(solution):
    """0 or 1, the same for every transform of a solution grid (training pools use class 0, test pools 1):
    a hash bit of the sorted cycle types of the permutations that take each row to each other row (and
    each column to each other column)."""
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
    """A random complete grid (81 digits), or None: the three diagonal boxes are random permutations,
    the search (digits in random order) completes the rest."""
    grid = [0] * 81
    for box in (18, 22, 26):
        for cell, digit in zip(UNITS[box], rng.permutation(9) + 1):
            grid[cell] = int(digit)
    solutions = sudoku_search(grid, limit=1, rng=rng)[0]
    return solutions[0] if solutions else None


def singles_rounds(grid):
    """Rounds of parallel singles that fill `grid` (81 digits, 0 blank), or None if singles get stuck.
    Each round sees only the digits placed before it: a blank whose peers leave it one digit (naked
    single), or the only blank of a unit where a digit can still go (hidden single), is filled."""
    grid, rounds = list(grid), 0
    while 0 in grid:
        used = [0] * 27                                 # digits placed in each unit
        for u, unit in enumerate(UNITS):
            for i in unit:
                if grid[i]:
                    used[u] |= 1 << (grid[i] - 1)
        cand = [0 if grid[i] else ALL_DIGITS & ~(used[a] | used[b] | used[c])
                for i, (a, b, c) in enumerate(CELL_UNITS)]
        fill = {i: m for i, m in enumerate(cand) if m and m & (m - 1) == 0}           # naked singles
        for unit in UNITS:
            once = twice = 0
            for i in unit:
                twice |= once & cand[i]
                once |= cand[i]
            for i in unit:
                m = cand[i] & once & ~twice                                             # hidden singles
                if m and m & (m - 1) == 0:
                    fill[i] = m
        if not fill:
            return None
        for i, m in fill.items():
            grid[i] = m.bit_length()
        rounds += 1
    return rounds


def make_puzzle(job):
    """job = ((kind, lo, hi), grid class, seed) -> (puzzle, solution, rounds, guesses) of a tier: the clues
    of a random grid are removed in random order while singles finish in t rounds, t drawn in lo..hi (or
    while the solution stays unique: a minimal puzzle); kept if its rounds (guesses) are in lo..hi.
    rounds is 0 for a puzzle singles cannot finish, guesses 0 for one they can."""
    (kind, lo, hi), want_class, entropy = job
    rng = np.random.default_rng(entropy)
    for _ in range(MAX_ATTEMPTS):
        try:
            solution = random_grid(rng)
            if solution is None or grid_class(solution) != want_class:
                continue
            puzzle, cap = list(solution), rng.integers(lo, hi + 1) if hi < math.inf else math.inf
            for i in rng.permutation(81):
                puzzle[i] = 0
                if kind == 'rounds':
                    rounds = singles_rounds(puzzle)
                    keep = rounds is not None and rounds <= cap
                else:
                    keep = len(sudoku_search(puzzle)[0]) == 1
                if not keep:
                    puzzle[i] = solution[i]
            rounds = singles_rounds(puzzle) or 0
            guesses = 0 if rounds else sudoku_search(puzzle)[1]
        except OverBudget:                              # discard the attempt
            continue
        if lo <= (rounds if kind == 'rounds' else guesses) <= hi:
            return puzzle, solution, rounds, guesses
    raise TaskError(f"no puzzle with {lo}..{hi} {kind} in {MAX_ATTEMPTS} attempts; is the tier reachable?")


def sudoku_tier(name):
    """(kind, lo, hi) of a tier, checked."""
    if name not in SUDOKU_TIERS:
        raise TaskError(f"unknown sudoku tier {name!r}; choose one of {', '.join(SUDOKU_TIERS)}")
    kind, lo, hi = SUDOKU_TIERS[name]
    if kind not in ('rounds', 'guesses') or not (0 if kind == 'guesses' else 1) <= lo <= hi:
        raise TaskError(f"sudoku tier {name!r} asks for {lo}..{hi} {kind}; need rounds >= 1 or guesses >= 0, lo <= hi")
    return kind, lo, hi


def generate_sudoku(tier, split, n, seed, workers=1, verbose=True):
    """n puzzles of a tier for split 'train' (grid class 0) or 'test' (class 1), one seed each, in
    `workers` processes -> puzzles, solutions (n, 81) int8, rounds, guesses (n,) int32 (see make_puzzle)."""
    spec = sudoku_tier(tier)
    if n < 1:
        raise TaskError(f"a sudoku pool needs at least 1 puzzle, got {n}")
    if split not in ('train', 'test'):
        raise TaskError(f"a sudoku pool is for 'train' or 'test', got {split!r}")
    tag = [zlib.crc32(tier.encode()), zlib.crc32(split.encode()), seed % 2 ** 63]
    jobs = [(spec, int(split == 'test'), tag + [i]) for i in range(n)]
    pool = worker_pool(workers) if workers > 1 else None
    results, t0, shown = [], time.time(), time.time()
    try:
        for result in (pool.imap(make_puzzle, jobs, chunksize=4) if pool else map(make_puzzle, jobs)):
            results.append(result)
            if verbose and (time.time() - shown > 5 or len(results) == n):   # every 5 seconds, and at the end
                shown = time.time()
                print(f"sudoku {split} pool {tier}: {len(results)}/{n} puzzles, {shown - t0:.0f}s, {workers} workers",
                      flush=True)
    finally:
        if pool:
            pool.terminate()
    puzzles, solutions, rounds, guesses = zip(*results)
    return {'puzzles': torch.tensor(puzzles, dtype=torch.int8), 'solutions': torch.tensor(solutions, dtype=torch.int8),
            'rounds': torch.tensor(rounds, dtype=torch.int32), 'guesses': torch.tensor(guesses, dtype=torch.int32)}


def sudoku_pool(tier, split, n, seed, workers=None, cache_dir=None, verbose=True):
    """generate_sudoku through the on-disk cache (one file per tier, split, size and seed), as numpy arrays."""
    kind, lo, hi = sudoku_tier(tier)
    workers = workers or ((os.cpu_count() or 1) if n >= 64 else 1)
    params = {'tier': tier, 'split': split, 'n': n, 'seed': seed, kind: f'{lo}-{hi}'}
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
    relabel = np.concatenate([np.zeros((n, 1), np.int64), rng.random((n, 9)).argsort(1) + 1], 1)  # (n, 10); 0 stays
    transform = lambda g: np.take_along_axis(relabel, np.take_along_axis(g.astype(np.int64), src, 1), 1)
    return transform(puzzles), transform(solutions)


# Chess. A puzzle is a position (placement and side to move: no castling or en passant rights, no clocks
# or history) whose side to move forces mate in N with exactly one first move, and no quicker mate. Each
# seed draws a candidate: the position 2N-1 plies before the mate ending a random game, or a sparse endgame.

PLAYOUT_SHARE = 0.5           # share of seeds that are game playouts (the rest: sparse endgames)
MAX_PLIES = 100               # a playout that has not ended in mate by then is dropped
TEST_ONE_IN = 4               # one position in TEST_ONE_IN (by a hash) is a test candidate
EDGE_SQUARES = [sq for sq in range(64) if sq % 8 in (0, 7) or sq // 8 in (0, 7)]


def _search_key(board):
    """Everything a search result depends on (no history: repetitions are ignored)."""
    return (board.pawns, board.knights, board.bishops, board.rooks, board.queens, board.kings,
            board.occupied_co[chess.WHITE], board.turn, board.castling_rights, board.ep_square)


def _attacks(piece_type, color, square, occupied):
    """The squares (a bitboard) a piece on `square` attacks, given the occupancy."""
    if piece_type == chess.PAWN:
        return chess.BB_PAWN_ATTACKS[color][square]
    if piece_type in (chess.KNIGHT, chess.KING):
        return (chess.BB_KNIGHT_ATTACKS if piece_type == chess.KNIGHT else chess.BB_KING_ATTACKS)[square]
    bb = chess.BB_DIAG_ATTACKS[square][chess.BB_DIAG_MASKS[square] & occupied] if piece_type != chess.ROOK else 0
    if piece_type != chess.BISHOP:
        bb |= chess.BB_RANK_ATTACKS[square][chess.BB_RANK_MASKS[square] & occupied]
        bb |= chess.BB_FILE_ATTACKS[square][chess.BB_FILE_MASKS[square] & occupied]
    return bb


def gives_check(board, move):
    """board.gives_check(move) without making the move."""
    if board.is_castling(move) or board.is_en_passant(move):
        return board.gives_check(move)
    king, origin = board.king(not board.turn), chess.BB_SQUARES[move.from_square]
    occupied = board.occupied & ~origin | chess.BB_SQUARES[move.to_square]
    if board.attackers_mask(board.turn, king, occupied) & ~origin:          # discovered check
        return True
    piece = move.promotion or board.piece_type_at(move.from_square)
    return bool(_attacks(piece, board.turn, move.to_square, occupied) & chess.BB_SQUARES[king])


def checking_moves(board):
    """The legal moves that give check: direct checks, moves off a line through the king, promotions,
    en passant and castling from bitboards, then gives_check."""
    king, us = board.king(not board.turn), board.turn
    direct = (chess.BB_KNIGHT_ATTACKS[king] | chess.BB_PAWN_ATTACKS[not us][king] |
              _attacks(chess.QUEEN, us, king, board.occupied))
    movers = _attacks(chess.QUEEN, us, king, 0) | board.pawns & (chess.BB_RANK_7 if us else chess.BB_RANK_2)
    candidates = dict.fromkeys([*board.generate_legal_moves(chess.BB_ALL, direct), *board.generate_legal_moves(movers),
                                *board.generate_legal_ep(), *board.generate_castling_moves()])
    return [move for move in candidates if gives_check(board, move)]


def forces_mate(board, move, n, memo=None):
    """True if `move` (legal) forces mate within n of its side's moves, this one included: an exact AND-OR
    search over every defence. `memo` caches attacker nodes by (position, moves left)."""
    memo = {} if memo is None else memo
    board.push(move)
    try:
        if board.is_checkmate():
            return True
        if n == 1:
            return False
        replies = 0
        for reply in board.legal_moves:
            replies += 1
            board.push(reply)
            key = (_search_key(board), n - 1)
            if key not in memo:
                memo[key] = bool(mating_moves(board, n - 1, 1, memo))
            board.pop()
            if not memo[key]:
                return False
        return replies > 0                    # no reply and no mate: stalemate
    finally:
        board.pop()


def solves(board, move, n):
    """True if `move` is legal on `board` and forces mate within n moves."""
    return board.is_legal(move) and forces_mate(board, move, n)


def mating_moves(board, n, limit=2, memo=None):
    """Up to `limit` first moves of the side to move that force mate within n moves. Checks are
    tried first, then captures; on the last move only checks."""
    memo = {} if memo is None else memo
    moves = checking_moves(board)
    if n > 1:                                 # any move may start a longer mate
        checks = set(moves)
        moves = sorted(board.legal_moves, key=lambda m: (m not in checks, not board.is_capture(m)))
    return list(itertools.islice((m for m in moves if forces_mate(board, m, n, memo)), limit))


def solve_puzzle(board, depth, memo=None):
    """The one first move that forces mate in `depth`, or None if the position is not a puzzle: no
    mate, a shorter mate, several mating first moves, or an under-promotion."""
    memo = {} if memo is None else memo
    if depth > 1 and mating_moves(board, depth - 1, 1, memo):     # a shorter mate
        return None
    moves = mating_moves(board, depth, 2, memo)
    return moves[0] if len(moves) == 1 and moves[0].promotion in (None, chess.QUEEN) else None


def _pick(rng, weights):
    """An index drawn in proportion to weights, from rng.random() alone."""
    r, total = rng.random() * sum(weights), 0
    for i, w in enumerate(weights):
        total += w
        if r < total:
            return i
    return len(weights) - 1


def _playout(rng):
    """A random game from the opening, biased towards captures and checks, taking a mate in one
    whenever there is one. Returns the final board (with its move stack)."""
    board = chess.Board()
    while board.ply() < MAX_PLIES and not board.is_insufficient_material():
        moves = list(board.legal_moves)
        if not moves:
            break
        checks = checking_moves(board)
        mate = next((m for m in checks if forces_mate(board, m, 1)), None)
        if mate:
            board.push(mate)
            break
        checks = set(checks)
        board.push(moves[_pick(rng, [1 + 3 * board.is_capture(m) + 3 * (m in checks) for m in moves])])
    return board


def _endgame(rng):
    """Two kings and a few random pieces: 2-4 for the side to move, 0-3 for the other; the
    defending king stands on the edge three times in four."""
    pieces = [chess.QUEEN, chess.ROOK, chess.BISHOP, chess.KNIGHT, chess.PAWN, chess.PAWN]
    while True:
        board, attacker = chess.Board(None), chess.WHITE if rng.random() < 0.5 else chess.BLACK
        n_att, n_def = 2 + int(3 * rng.random()), int(4 * rng.random())
        squares = []
        while len(squares) < 2 + n_att + n_def:
            sq = int(64 * rng.random())
            if len(squares) == 1 and rng.random() < 0.75:     # the defending king
                sq = EDGE_SQUARES[int(len(EDGE_SQUARES) * rng.random())]
            if sq not in squares:
                squares.append(sq)
        kinds = [chess.KING, chess.KING] + [pieces[int(len(pieces) * rng.random())] for _ in squares[2:]]
        colors = [attacker, not attacker] + [attacker] * n_att + [not attacker] * n_def
        for sq, kind, color in zip(squares, kinds, colors):
            board.set_piece_at(sq, chess.Piece(kind, color))
        board.turn = attacker
        if board.is_valid():
            return board


def _before_mate(game):
    """{depth: the position 2*depth-1 plies before the mate that ended `game`} for every depth up to
    MAX_DEPTH that the game is long enough for; {} if it did not end in mate."""
    positions, board = {}, game.copy()
    if game.is_checkmate():
        for ply in range(1, min(2 * MAX_DEPTH - 1, len(game.move_stack)) + 1):
            board.pop()
            if ply % 2:
                positions[(ply + 1) // 2] = board.copy(stack=False)
    return positions


def _puzzle_board(board):
    """`board` with clocks reset; None if it is None or has castling or en passant rights."""
    if board is None or board.castling_rights or board.has_legal_en_passant():
        return None
    return chess.Board(f"{board.board_fen()} {'w' if board.turn else 'b'} - - 0 1")


def position_key(board):
    """The position as the model sees it (mirrored to white to move), up to the a<->h mirror."""
    frame = board if board.turn == chess.WHITE else board.mirror()
    return min(frame.board_fen(), frame.transform(chess.flip_horizontal).board_fen())


def key_side(key):
    """'train' or 'test' from a hash of a position key."""
    return 'test' if hashlib.sha256(key.encode()).digest()[0] % TEST_ONE_IN == 0 else 'train'


def puzzles_at(seed, wanted):
    """What one seed gives the (depth, side) streams in `wanted`: {(depth, side): dict(seed, kind, fen, move,
    key)}. A candidate is a test puzzle if its position hashes to test, a training puzzle only if none of
    its game's candidate positions (every depth) does: no game feeds both sides."""
    if not wanted:
        return {}
    rng = random.Random(seed)
    if rng.random() < PLAYOUT_SHARE:
        kind, positions = 'playout', _before_mate(_playout(rng))      # castling rights or not
        boards = {depth: _puzzle_board(positions.get(depth)) for depth in range(1, MAX_DEPTH + 1)}
    else:
        kind, board = 'endgame', _endgame(rng)
        positions = boards = {depth: board for depth in range(1, MAX_DEPTH + 1)}
    test_game = any(key_side(position_key(p)) == 'test' for p in positions.values())
    found, memo = {}, {}
    for depth, side in sorted(wanted):
        board = boards[depth]
        if board is None:
            continue
        key = position_key(board)
        ours = key_side(key) == 'test' if side == 'test' else not test_game
        move = ours and solve_puzzle(board, depth, memo)
        if move:
            found[(depth, side)] = {'seed': seed, 'kind': kind, 'fen': board.fen(), 'move': move.uci(), 'key': key}
    return found


def generate_puzzles(wanted, workers=None, have=None, progress=None):
    """The first wanted[(depth, side)] distinct puzzles of each stream, seeds 0, 1, 2, ... in order, extending
    the prefixes in `have` -> {(depth, side): [puzzle, ...]}, whatever the number of workers.
    progress(streams), if given, sees the streams (prefixes) after each chunk of seeds."""
    streams = {k: list((have or {}).get(k, []))[:n] for k, n in wanted.items()}
    keys = {k: {p['key'] for p in ps} for k, ps in streams.items()}
    done_to = {k: ps[-1]['seed'] if ps else -1 for k, ps in streams.items()}   # a prefix covers seeds up to here
    open_streams = lambda: [k for k in sorted(wanted) if len(streams[k]) < wanted[k]]
    seed, workers = min((done_to[k] + 1 for k in open_streams()), default=0), workers or os.cpu_count() or 1
    pool = worker_pool(workers) if workers > 1 and open_streams() else None
    try:
        while open_streams():
            jobs = [(s, tuple(k for k in open_streams() if s > done_to[k])) for s in range(seed, seed + 16 * workers)]
            results = pool.starmap(puzzles_at, jobs, chunksize=4) if pool else itertools.starmap(puzzles_at, jobs)
            for found in results:
                for k, p in sorted(found.items()):
                    if len(streams[k]) < wanted[k] and p['key'] not in keys[k]:
                        streams[k].append(p)
                        keys[k].add(p['key'])
            seed += len(jobs)
            if progress:
                progress(streams)
    finally:
        if pool:
            pool.terminate()
    return streams


PUZZLE_HEADER = f"# chess puzzles v{CHESS_VERSION}, lines depth;side;seed;kind;fen;move, body sha256 "


def read_puzzle_file(path=PUZZLE_FILE):
    """{(depth, side): [puzzle, ...]} from the shipped file, a prefix of each stream written by
    `python tasks.py chess_puzzles`. A missing, stale, edited or malformed file counts as empty."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        header, _, body = f.read().partition('\n')
    streams = {}
    try:
        if header != PUZZLE_HEADER + hashlib.sha256(body.encode()).hexdigest():
            raise ValueError("not a puzzle file of this version, or its checksum does not match")
        for line in body.splitlines():
            depth, side, seed, kind, fen, move = line.split(';')
            streams.setdefault((int(depth), side), []).append(
                {'seed': int(seed), 'kind': kind, 'fen': fen, 'move': move, 'key': position_key(chess.Board(fen))})
    except ValueError as err:
        print(f"ignoring {path}: {err}")
        return {}
    return streams


def write_puzzle_file(sizes, path=PUZZLE_FILE, workers=None):
    """(Re)write the shipped file with the first sizes[(depth, side)] puzzles of each stream, extending
    what the file already holds; saved (atomically) every minute and at the end."""
    t0 = last_save = time.time()

    def save(streams):
        body = ''.join(f"{d};{side};{p['seed']};{p['kind']};{p['fen']};{p['move']}\n"
                       for (d, side), puzzles in sorted(streams.items()) for p in puzzles)
        with open(f'{path}.tmp', 'w') as f:
            f.write(PUZZLE_HEADER + hashlib.sha256(body.encode()).hexdigest() + '\n' + body)
        os.replace(f'{path}.tmp', path)

    def save_every_minute(streams):
        nonlocal last_save
        if time.time() - last_save > 60:
            save(streams)
            last_save = time.time()
    streams = generate_puzzles(sizes, workers, read_puzzle_file(path), progress=save_every_minute)
    save(streams)
    for (depth, side), puzzles in sorted(streams.items()):
        playouts = sum(p['kind'] == 'playout' for p in puzzles)
        print(f"mate in {depth} {side:5}: {len(puzzles):5d} puzzles, {playouts:5d} from playouts, "
              f"{len(puzzles) - playouts:5d} endgames, seeds 0..{puzzles[-1]['seed']}")
    print(f"wrote {path} in {time.time() - t0:.0f}s")


def chess_pool(depth, side, count):
    """The first `count` puzzles of the (depth, side) stream (the shipped file's prefix, then generation)
    through the on-disk cache: x (count, 64) long, y (count, 64, 64) int8, and the lists fen, move, kind."""
    def build():
        have = read_puzzle_file()
        if len(have.get((depth, side), [])) < count:
            print(f"generating mate-in-{depth} {side} puzzles up to {count} (pure-Python search: minutes)")
        puzzles = generate_puzzles({(depth, side): count}, have=have)[(depth, side)]
        boards = [chess.Board(p['fen']) for p in puzzles]
        return {'x': torch.stack([encode_board(b) for b in boards]),
                'y': torch.stack([encode_move(b, chess.Move.from_uci(p['move'])).to(torch.int8)
                                  for b, p in zip(boards, puzzles)]),
                **{k: [p[k] for p in puzzles] for k in ('fen', 'move', 'kind')}}
    return cached('chess', CHESS_VERSION, {'depth': depth, 'side': side, 'n': count}, build)


if __name__ == '__main__':
    # python tasks.py chess_puzzles [N]: (re)write the shipped puzzle file with at least the default pool
    # sizes (N training puzzles per depth if given), keeping every puzzle it already holds
    if sys.argv[1:2] != ['chess_puzzles'] or len(sys.argv) > 3 or not all(a.isdigit() for a in sys.argv[2:]):
        raise SystemExit("usage: python tasks.py chess_puzzles [training puzzles per depth]")
    n_train = int(sys.argv[2]) if len(sys.argv) == 3 else Chess.train_pool
    sizes = {(1, 'train'): n_train, (2, 'train'): n_train,
             **{(d, 'test'): Chess.test_pool for d in range(1, MAX_DEPTH + 1)}}
    held = read_puzzle_file()
    write_puzzle_file({k: max(n, len(held.get(k, []))) for k, n in sizes.items()})
