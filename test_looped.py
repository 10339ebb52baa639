"""pytest suite: CPU only, a few minutes. Run with `python -m pytest -q`."""

import itertools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from looped import LoopedConfig, LoopedTransformer, CheckpointError, RECALLS, INNER_NORMS
import tasks
import train

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, timeout=300):
    """Run one of the project's scripts in a subprocess; returns CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)


def tiny_config(**kw):
    base = dict(vocab_size=2, n_classes=2, block_size=8, d_model=16, n_head=2, n_iters=3, causal=True)
    return LoopedConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ model

@pytest.mark.parametrize('recall,inner,outer', list(itertools.product(RECALLS, INNER_NORMS, (True, False))))
def test_every_variant_builds_and_shapes(recall, inner, outer):
    model = LoopedTransformer(tiny_config(recall=recall, inner_norm=inner, outer_norm=outer))
    idx = torch.randint(0, 2, (3, 8))
    assert model(idx).shape == (3, 8, 2)
    assert model(idx, n_iters=5).shape == (3, 8, 2)


# ---- sudoku

SUDOKU_LINES = ([[r * 9 + c for c in range(9)] for r in range(9)] + [[r * 9 + c for r in range(9)] for c in range(9)] +
                [[r * 9 + c for r in range(br, br + 3) for c in range(bc, bc + 3)] for br in (0, 3, 6) for bc in (0, 3, 6)])


def exact_cover_solutions(puzzle, limit=2):
    """Independent solver: Knuth's Algorithm X on the 324 constraints (cell filled; row, column, box
    holds digit d), in dict-of-sets form. Returns up to `limit` solutions (lists of 81 digits)."""
    meets = {}                                          # choice (cell, digit) -> the 4 constraints it meets
    for cell in range(81):
        r, c = divmod(cell, 9)
        for d in range(1, 10):
            meets[cell, d] = [('cell', cell), ('row', r, d), ('col', c, d), ('box', r // 3 * 3 + c // 3, d)]
    who = {}                                            # constraint -> choices meeting it
    for choice, constraints in meets.items():
        for k in constraints:
            who.setdefault(k, set()).add(choice)

    def select(choice):
        removed = []
        for k in meets[choice]:
            for other in who[k]:
                for k2 in meets[other]:
                    if k2 != k:
                        who[k2].discard(other)
            removed.append(who.pop(k))
        return removed

    def deselect(choice, removed):
        for k in reversed(meets[choice]):
            who[k] = removed.pop()
            for other in who[k]:
                for k2 in meets[other]:
                    if k2 != k:
                        who[k2].add(other)

    for cell, d in enumerate(puzzle):
        if d:
            if any(k not in who or (cell, d) not in who[k] for k in meets[cell, d]):
                return []                               # givens clash
            select((cell, d))
    solutions, chosen = [], []

    def search():
        if not who:
            grid = list(puzzle)
            for cell, d in chosen:
                grid[cell] = d
            solutions.append(grid)
            return
        k = min(who, key=lambda k: len(who[k]))
        for choice in sorted(who[k]):
            if len(solutions) >= limit:
                return
            chosen.append(choice)
            removed = select(choice)
            search()
            deselect(choice, removed)
            chosen.pop()
    search()
    return solutions


def singles_fill(puzzle):
    """Independent 'no guessing' check: naked and hidden singles on sets of candidates until
    nothing changes; returns the grid reached (0 where still undecided)."""
    cand = [{d} if d else set(range(1, 10)) for d in puzzle]
    changed = True
    while changed:
        changed = False
        for line in SUDOKU_LINES:
            for cell in line:
                if len(cand[cell]) == 1:
                    for other in line:
                        if other != cell and cand[cell] <= cand[other]:
                            cand[other] -= cand[cell]
                            changed = True
            for d in range(1, 10):
                places = [cell for cell in line if d in cand[cell]]
                if len(places) == 1 and len(cand[places[0]]) > 1:
                    cand[places[0]] = {d}
                    changed = True
    return [min(s) if len(s) == 1 else 0 for s in cand]


def is_minimal(puzzle):
    """Every given is needed: without any one of them the puzzle has several solutions."""
    return all(len(exact_cover_solutions(puzzle[:i] + [0] + puzzle[i + 1:])) == 2 for i in range(81) if puzzle[i])


def valid_grid(grid):
    return all(sorted(grid[i] for i in line) == list(range(1, 10)) for line in SUDOKU_LINES)


def transform_grid(grid, rng):
    """Independent sudoku symmetry: relabel digits, shuffle bands, stacks, rows in bands, columns in
    stacks, maybe transpose (plain Python, not the project's vectorized augmentation)."""
    digit = [0] + rng.sample(range(1, 10), 9)
    def order():
        return [3 * band + line for band in rng.sample(range(3), 3) for line in rng.sample(range(3), 3)]
    rows, cols, flip = order(), order(), rng.random() < 0.5
    out = [digit[grid[rows[r] * 9 + cols[c]]] for r in range(9) for c in range(9)]
    return [out[c * 9 + r] for r in range(9) for c in range(9)] if flip else out


SUDOKU_TEST_SIZES = {'easy': 6, 'medium': 4, 'tough': 2, 'hard': 2, 'expert': 2}


@pytest.fixture(scope='module')
def sudoku_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('sudoku_cache'))


@pytest.fixture(scope='module')
def sudoku_pools(sudoku_cache):
    return {tier: tasks.sudoku_pool(tier, 'test', n, 1, workers=1, cache_dir=sudoku_cache, verbose=False)
            for tier, n in SUDOKU_TEST_SIZES.items()}


def test_sudoku_puzzles_unique_rated_and_minimal(sudoku_pools):
    for tier, pool in sudoku_pools.items():
        (lo, hi), (glo, ghi) = tasks.SUDOKU_TIERS[tier]
        for puzzle, solution, guesses in zip(pool['puzzles'].tolist(), pool['solutions'].tolist(), pool['guesses'].tolist()):
            assert exact_cover_solutions(puzzle) == [solution], tier
            assert all(p in (0, s) for p, s in zip(puzzle, solution))
            clues = sum(p > 0 for p in puzzle)
            assert lo <= clues and (clues <= hi or is_minimal(puzzle)), (tier, clues)   # stopped at the target, or earlier
            assert glo <= guesses <= ghi
            solved_by_singles = singles_fill(puzzle) == solution
            assert solved_by_singles == (ghi == 0), (tier, guesses)   # guesses 0 <=> no guessing needed
        if lo == 17:   # minimal tiers (checked on the first puzzle)
            assert is_minimal(pool['puzzles'][0].tolist()), tier


def test_sudoku_tiers_differ_in_rating(sudoku_pools):
    clues = {t: (p['puzzles'] > 0).sum(1).mean() for t, p in sudoku_pools.items()}
    guesses = {t: p['guesses'].mean() for t, p in sudoku_pools.items()}
    assert clues['easy'] > clues['medium'] > clues['tough']
    assert guesses['easy'] == guesses['medium'] == guesses['tough'] == 0 < guesses['hard'] < guesses['expert']


def test_sudoku_augmentation_keeps_puzzles_valid(sudoku_pools):
    rng = np.random.default_rng(0)
    for tier in ('easy', 'hard'):
        pool = sudoku_pools[tier]
        x, y = tasks.augment_sudoku(pool['puzzles'], pool['solutions'], rng)
        assert (x != pool['puzzles']).any()
        for puzzle, solution, base in zip(x.tolist(), y.tolist(), pool['puzzles'].tolist()):
            assert valid_grid(solution)
            assert all(p in (0, s) for p, s in zip(puzzle, solution))          # givens are a subset of the solution
            assert sum(p > 0 for p in puzzle) == sum(p > 0 for p in base)
            assert exact_cover_solutions(puzzle) == [solution]
            assert (singles_fill(puzzle) == solution) == (tier == 'easy')     # transforms keep the rating 0 / > 0


def test_sudoku_train_batch_encoding_and_determinism(sudoku_cache, monkeypatch):
    monkeypatch.setenv('LOOPED_SUDOKU_POOL', '6')
    task = tasks.Sudoku(cache_dir=sudoku_cache)
    x, y = task.train_batch('easy', 16, torch.Generator().manual_seed(5))
    assert x.shape == y.shape == (16, 81) and x.dtype == y.dtype == torch.long
    assert 0 <= x.min() and x.max() <= 9 and 0 <= y.min() and y.max() <= 8
    assert ((x == 0) | (x == y + 1)).all() and all(valid_grid((row + 1).tolist()) for row in y)
    x2, y2 = task.train_batch('easy', 16, torch.Generator().manual_seed(5))
    x3, _ = task.train_batch('easy', 16, torch.Generator().manual_seed(6))
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)


def test_sudoku_same_seed_same_puzzles_any_workers():
    a = tasks.generate_sudoku('medium', 'train', 6, 3, workers=1, verbose=False)
    b = tasks.generate_sudoku('medium', 'train', 6, 3, workers=2, verbose=False)
    c = tasks.generate_sudoku('medium', 'train', 6, 4, workers=1, verbose=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['puzzles'], c['puzzles'])


def test_sudoku_train_and_test_pools_share_no_equivalent_puzzle(sudoku_pools, sudoku_cache, monkeypatch):
    rng = random.Random(0)
    grids = tasks.generate_sudoku('easy', 'train', 4, 0, verbose=False)['solutions'].tolist()
    grids += [p['solutions'][0].tolist() for p in sudoku_pools.values()]
    for grid in grids:                                  # the class is invariant under independent transforms
        assert all(tasks.grid_class(transform_grid(grid, rng)) == tasks.grid_class(grid) for _ in range(5))
    assert {tasks.grid_class(g) for g in grids} == {0, 1}
    monkeypatch.setenv('LOOPED_SUDOKU_POOL', '6')       # any transform of a training puzzle is class 0 ...
    x, y = tasks.Sudoku(cache_dir=sudoku_cache).train_batch('easy', 32, torch.Generator().manual_seed(0))
    assert all(tasks.grid_class((row + 1).tolist()) == 0 for row in y)
    for pool in sudoku_pools.values():                  # ... and every evaluation puzzle is class 1
        assert all(tasks.grid_class(s) == 1 for s in pool['solutions'].tolist())


def test_sudoku_score_checks_rules_and_givens(sudoku_pools):
    task = tasks.Sudoku()
    solution = torch.tensor(sudoku_pools['easy']['solutions'][0].tolist())
    x = torch.where(solution <= 2, solution, 0)         # givens: the 1s and 2s
    split = {'x': x[None], 'y': solution[None] - 1}
    score = lambda grid: task.score(torch.nn.functional.one_hot(grid[None] - 1, 9).float(), split)
    assert score(solution) == {'cell': 1.0, 'exact': 1.0}
    swap34 = torch.tensor([0, 1, 2, 4, 3, 5, 6, 7, 8, 9])[solution]     # another valid grid keeping the givens
    assert score(swap34)['exact'] == 1.0 and score(swap34)['cell'] < 1.0
    swap13 = torch.tensor([0, 3, 2, 1, 4, 5, 6, 7, 8, 9])[solution]     # valid grid, breaks givens
    assert score(swap13)['exact'] == 0.0
    blank, given = int((x == 0).nonzero()[0]), int((x > 0).nonzero()[0])
    broken = solution.clone()
    broken[blank] = solution[blank] % 9 + 1                             # a digit twice in a row
    assert score(broken) == {'cell': pytest.approx(1 - 1 / int((x == 0).sum())), 'exact': 0.0}
    wrong_given = solution.clone()
    wrong_given[given] = solution[given] % 9 + 1
    assert score(wrong_given) == {'cell': 1.0, 'exact': 0.0}            # cell accuracy counts blanks only


def test_sudoku_corrupt_cache_is_regenerated(tmp_path, capsys):
    first = tasks.sudoku_pool('easy', 'train', 3, 7, cache_dir=str(tmp_path), verbose=False)
    [path] = tmp_path.iterdir()
    for garbage in (b'not a cache file', path.read_bytes()[:100]):
        path.write_bytes(garbage)
        again = tasks.sudoku_pool('easy', 'train', 3, 7, cache_dir=str(tmp_path))
        assert all((first[k] == again[k]).all() for k in first)
        assert 'regenerating' in capsys.readouterr().out


def test_sudoku_bad_input_is_a_one_line_error(monkeypatch):
    with pytest.raises(tasks.TaskError, match='unknown sudoku tier'):
        tasks.Sudoku().parse_difficulty('nightmare')
    for bad in (((16, 30), (0, 0)), ((30, 82), (0, 0)), ((40, 30), (0, 0)), ((30, 40), (2, 1))):
        monkeypatch.setitem(tasks.SUDOKU_TIERS, 'bad', bad)
        with pytest.raises(tasks.TaskError, match='need 17 <= clues <= 81'):
            tasks.sudoku_pool('bad', 'train', 2, 0, verbose=False)
        with pytest.raises(tasks.TaskError, match="tier 'bad'"):
            tasks.Sudoku()
    with pytest.raises(tasks.TaskError, match='at least 1 puzzle'):
        tasks.generate_sudoku('easy', 'train', 0, 0)
    monkeypatch.setitem(tasks.SUDOKU_TIERS, 'bad', ((45, 45), (5, 5)))     # unreachable: gives up, never hangs
    monkeypatch.setattr(tasks, 'MAX_ATTEMPTS', 3)
    with pytest.raises(tasks.TaskError, match='in 3 attempts'):
        tasks.generate_sudoku('bad', 'train', 1, 0, verbose=False)
    r = run_script('train.py', '--task', 'sudoku', '--train_difficulty', 'nightmare')
    assert r.returncode != 0 and r.stderr.strip().count('\n') == 0 and 'unknown sudoku tier' in r.stderr
    monkeypatch.setenv('LOOPED_SUDOKU_POOL', '0')
    with pytest.raises(tasks.TaskError, match='LOOPED_SUDOKU_POOL'):
        tasks.Sudoku()


def test_sudoku_train_script_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv('LOOPED_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('LOOPED_SUDOKU_POOL', '8')
    out = tmp_path / 'out'
    r = run_script('train.py', '--task', 'sudoku', '--max_steps', '2', '--batch_size', '4', '--d_model', '16',
                   '--n_head', '2', '--n_iters', '2', '--eval_n', '3', '--eval_batch', '3', '--log_interval', '1',
                   '--eval_difficulties', 'easy,hard', '--out_dir', str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / 'eval.json').read_text())['rows']
    assert [row['difficulty'] for row in rows] == ['easy', 'hard']
    assert all(set(s) == {'cell', 'exact'} for row in rows for s in row['scores'].values())
