"""tasks.py: prefix sums, sudoku and chess generators checked against independent references."""

import json
import random

import numpy as np
import chess
import pytest
import torch

import tasks

from conftest import run_script


def test_prefix_sums_targets_are_prefix_parities():
    x, y = tasks.PrefixSums().train_batch(20, 50, torch.Generator().manual_seed(0))
    for bits, parity in zip(x.tolist(), y.tolist()):
        running = 0
        for b, p in zip(bits, parity):
            running ^= b
            assert p == running


def test_prefix_sums_eval_sets_are_seeded_and_distinct():
    t = tasks.PrefixSums()
    assert torch.equal(t.eval_set(16, 8, seed=3)['x'], t.eval_set(16, 8, seed=3)['x'])
    assert not torch.equal(t.eval_set(16, 8, seed=3)['x'], t.eval_set(16, 8, seed=4)['x'])


def test_token_scores():
    y = torch.tensor([[0, 1, 1], [1, 1, -100]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 1, 0], [1, 1, 0]]), 2).float()
    s = tasks.token_scores(logits, y)
    assert s['token'] == pytest.approx(4 / 5) and s['exact'] == pytest.approx(0.5)


def test_cache_regenerates_stale_or_corrupt_files(tmp_path):
    calls = []
    build = lambda: calls.append(1) or {'x': torch.arange(5)}
    assert torch.equal(tasks.cached('t', 1, {'n': 5}, build, tmp_path)['x'], torch.arange(5))
    tasks.cached('t', 1, {'n': 5}, build, tmp_path)
    assert len(calls) == 1                                     # second call read the cache
    (path,) = tmp_path.glob('t_v1_*.pt')
    path.write_bytes(path.read_bytes()[:50])                   # truncate: corrupt
    assert torch.equal(tasks.cached('t', 1, {'n': 5}, build, tmp_path)['x'], torch.arange(5))
    assert len(calls) == 2
    blob = torch.load(path, weights_only=True)
    blob['payload']['x'][0] = 7                                # edited content: checksum mismatch
    torch.save(blob, path)
    assert torch.equal(tasks.cached('t', 1, {'n': 5}, build, tmp_path)['x'], torch.arange(5))
    assert len(calls) == 3


def test_unknown_task_and_bad_difficulty():
    with pytest.raises(tasks.TaskError, match='unknown task'):
        tasks.get_task('nope')
    with pytest.raises(tasks.TaskError):
        tasks.PrefixSums().parse_difficulty('long')
    with pytest.raises(tasks.TaskError):
        tasks.PrefixSums().parse_difficulty('0')


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


def rounds_of_singles(puzzle):
    """Independent rating: rounds of parallel naked and hidden singles (each round sees only the
    digits placed before it) until the grid is full, or None if a round finds nothing."""
    grid, rounds = list(puzzle), 0
    while 0 in grid:
        seen = lambda cell: {grid[o] for line in SUDOKU_LINES if cell in line for o in line}
        cand = {cell: set(range(1, 10)) - seen(cell) for cell in range(81) if not grid[cell]}
        fill = {cell: min(s) for cell, s in cand.items() if len(s) == 1}
        for line in SUDOKU_LINES:
            for d in range(1, 10):
                places = [cell for cell in line if d in cand.get(cell, ())]
                if len(places) == 1:
                    fill[places[0]] = d
        if not fill:
            return None
        for cell, d in fill.items():
            grid[cell] = d
        rounds += 1
    return rounds


SUDOKU_TEST_SIZES = {'r1-4': 6, 'r5-8': 4, 'r9-16': 2, 'r17+': 1, 'g1-2': 2, 'g3+': 2}


@pytest.fixture(scope='module')
def sudoku_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('sudoku_cache'))


@pytest.fixture(scope='module')
def sudoku_pools(sudoku_cache):
    return {tier: tasks.sudoku_pool(tier, 'test', n, 1, workers=1, cache_dir=sudoku_cache, verbose=False)
            for tier, n in SUDOKU_TEST_SIZES.items()}


def test_sudoku_puzzles_unique_and_rated(sudoku_pools):
    for tier, pool in sudoku_pools.items():
        kind, lo, hi = tasks.SUDOKU_TIERS[tier]
        for puzzle, solution, rounds, guesses in zip(*(pool[k].tolist() for k in ('puzzles', 'solutions', 'rounds', 'guesses'))):
            assert exact_cover_solutions(puzzle) == [solution], tier
            assert all(p in (0, s) for p, s in zip(puzzle, solution))
            assert rounds_of_singles(puzzle) == (rounds or None), tier          # 0: singles get stuck
            assert (singles_fill(puzzle) == solution) == (rounds > 0), tier
            assert lo <= (rounds if kind == 'rounds' else guesses) <= hi, tier
            assert (guesses == 0) == (kind == 'rounds'), tier
        if kind == 'guesses':   # guess tiers hold minimal puzzles (checked on the first one)
            assert is_minimal(pool['puzzles'][0].tolist()), tier


def test_sudoku_tiers_differ_in_rating(sudoku_pools):
    rounds = [sudoku_pools[t]['rounds'].mean() for t in ('r1-4', 'r5-8', 'r9-16', 'r17+')]
    assert rounds == sorted(rounds) and len(set(rounds)) == 4
    assert 0 < sudoku_pools['g1-2']['guesses'].mean() < sudoku_pools['g3+']['guesses'].mean()


def test_sudoku_augmentation_keeps_puzzles_valid(sudoku_pools):
    rng = np.random.default_rng(0)
    for tier in ('r5-8', 'g1-2'):
        pool = sudoku_pools[tier]
        x, y = tasks.augment_sudoku(pool['puzzles'], pool['solutions'], rng)
        assert (x != pool['puzzles']).any()
        for puzzle, solution, base in zip(x.tolist(), y.tolist(), pool['puzzles'].tolist()):
            assert valid_grid(solution)
            assert all(p in (0, s) for p, s in zip(puzzle, solution))          # givens are a subset of the solution
            assert sum(p > 0 for p in puzzle) == sum(p > 0 for p in base)
            assert exact_cover_solutions(puzzle) == [solution]
            assert rounds_of_singles(puzzle) == rounds_of_singles(base)         # transforms keep the rating


def test_sudoku_train_batch_encoding_and_determinism(sudoku_cache, monkeypatch):
    monkeypatch.setenv('LOOPED_SUDOKU_POOL', '6')
    task = tasks.Sudoku(cache_dir=sudoku_cache)
    x, y = task.train_batch('r1-4', 16, torch.Generator().manual_seed(5))
    assert x.shape == y.shape == (16, 81) and x.dtype == y.dtype == torch.long
    assert 0 <= x.min() and x.max() <= 9 and 0 <= y.min() and y.max() <= 8
    assert ((x == 0) | (x == y + 1)).all() and all(valid_grid((row + 1).tolist()) for row in y)
    assert all(1 <= rounds_of_singles(row.tolist()) <= 4 for row in x)
    x2, y2 = task.train_batch('r1-4', 16, torch.Generator().manual_seed(5))
    x3, _ = task.train_batch('r1-4', 16, torch.Generator().manual_seed(6))
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)


def test_sudoku_same_seed_same_puzzles_any_workers():
    a = tasks.generate_sudoku('r5-8', 'train', 6, 3, workers=1, verbose=False)
    b = tasks.generate_sudoku('r5-8', 'train', 6, 3, workers=2, verbose=False)
    c = tasks.generate_sudoku('r5-8', 'train', 6, 4, workers=1, verbose=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['puzzles'], c['puzzles'])


def test_sudoku_train_and_test_pools_share_no_equivalent_puzzle(sudoku_pools, sudoku_cache, monkeypatch):
    rng = random.Random(0)
    grids = tasks.generate_sudoku('r1-4', 'train', 4, 0, verbose=False)['solutions'].tolist()
    grids += [p['solutions'][0].tolist() for p in sudoku_pools.values()]
    for grid in grids:                                  # the class is invariant under independent transforms
        assert all(tasks.grid_class(transform_grid(grid, rng)) == tasks.grid_class(grid) for _ in range(5))
    assert {tasks.grid_class(g) for g in grids} == {0, 1}
    monkeypatch.setenv('LOOPED_SUDOKU_POOL', '6')       # any transform of a training puzzle is class 0 ...
    x, y = tasks.Sudoku(cache_dir=sudoku_cache).train_batch('r1-4', 32, torch.Generator().manual_seed(0))
    assert all(tasks.grid_class((row + 1).tolist()) == 0 for row in y)
    for pool in sudoku_pools.values():                  # ... and every evaluation puzzle is class 1
        assert all(tasks.grid_class(s) == 1 for s in pool['solutions'].tolist())


def test_sudoku_score_checks_rules_and_givens(sudoku_pools):
    task = tasks.Sudoku()
    solution = torch.tensor(sudoku_pools['r1-4']['solutions'][0].tolist())
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
    first = tasks.sudoku_pool('r1-4', 'train', 3, 7, cache_dir=str(tmp_path), verbose=False)
    [path] = tmp_path.iterdir()
    for garbage in (b'not a cache file', path.read_bytes()[:100]):
        path.write_bytes(garbage)
        again = tasks.sudoku_pool('r1-4', 'train', 3, 7, cache_dir=str(tmp_path))
        assert all((first[k] == again[k]).all() for k in first)
        assert 'regenerating' in capsys.readouterr().out


def test_sudoku_bad_input_is_a_one_line_error(monkeypatch):
    with pytest.raises(tasks.TaskError, match='unknown sudoku tier'):
        tasks.Sudoku().parse_difficulty('nightmare')
    for bad in (('rounds', 0, 4), ('rounds', 5, 4), ('guesses', -1, 2), ('clues', 17, 20)):
        monkeypatch.setitem(tasks.SUDOKU_TIERS, 'bad', bad)
        with pytest.raises(tasks.TaskError, match='need rounds >= 1 or guesses >= 0'):
            tasks.sudoku_pool('bad', 'train', 2, 0, verbose=False)
        with pytest.raises(tasks.TaskError, match="tier 'bad'"):
            tasks.Sudoku()
    with pytest.raises(tasks.TaskError, match='at least 1 puzzle'):
        tasks.generate_sudoku('r1-4', 'train', 0, 0)
    monkeypatch.setitem(tasks.SUDOKU_TIERS, 'bad', ('rounds', 60, 60))      # unreachable: gives up, never hangs
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
                   '--eval_difficulties', 'r1-4,g1-2', '--out_dir', str(out), '--max_iters', '5')
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / 'eval.json').read_text())['rows']
    assert [row['difficulty'] for row in rows] == ['r1-4', 'g1-2']
    assert all(set(s) == {'cell', 'exact'} for row in rows for s in [*row['scores'].values(), row['halt']['scores']])
    assert all(2 <= row['halt']['mean_iters'] <= row['halt']['max_iters'] <= 5 for row in rows)   # n_iters, then up to the cap


KNOWN_PUZZLES = [  # (fen, N, the one first move that mates in N, or None: not a mate-in-N puzzle)
    ("6k1/5ppp/8/8/8/8/8/R5K1 w - - 0 1", 1, 'a1a8'),                                    # back-rank mate
    ("r5k1/8/8/8/8/8/5PPP/6K1 b - - 0 1", 1, 'a8a1'),                                    # the same, black to move
    ("r1bqkb1r/pppp1ppp/2n2n2/4p2Q/2B1P3/8/PPPP1PPP/RNB1K1NR w - - 0 1", 1, 'h5f7'),     # scholar's mate
    ("kbK5/pp6/1P6/8/8/8/8/R7 w - - 0 1", 2, 'a1a6'),                                    # Morphy: 1.Ra6! bxa6 2.b7#
    ("k7/P6Q/8/8/8/8/p6p/K6R w - - 0 1", 3, 'a1b2'),                                     # 1904 problem: 1.Kb2! a1=Q+ 2.Rxa1
    ("6k1/5ppp/8/8/8/8/8/RR4K1 w - - 0 1", 1, None),                                     # two mates: Ra8# and Rb8#
    ("7k/5K2/8/6Q1/8/8/8/8 w - - 0 1", 1, None),                                         # five mates in one
    ("6k1/5ppp/8/8/8/8/8/R5K1 w - - 0 1", 2, None),                                      # a mate in 1 is shorter
    ("kbK5/pp6/1P6/8/8/8/8/R7 w - - 0 1", 3, None),                                      # a mate in 2 is shorter
    ("6nb/5Ppk/6pp/8/8/8/8/K7 w - - 0 1", 1, None),                                      # only f8=N mates: not encodable
    ("rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w - - 0 1", 2, None),                  # no mate at all
]


@pytest.mark.parametrize('fen,n,solution', KNOWN_PUZZLES)
def test_chess_mate_search_on_known_positions(fen, n, solution):
    move = tasks.solve_puzzle(chess.Board(fen), n)
    assert (move and move.uci()) == solution


def test_chess_search_counts_stalemate_as_no_mate():
    board = chess.Board("7k/5K2/8/6Q1/8/8/8/8 w - - 0 1")
    stalemating = chess.Move.from_uci('g5g6')
    assert not any(tasks.forces_mate(board, stalemating, n) for n in (1, 2, 3))
    assert tasks.forces_mate(board, chess.Move.from_uci('g5g7'), 1)
    assert [m.uci() for m in tasks.mating_moves(board, 1, limit=9)] == ['g5g8', 'g5g7', 'g5h6', 'g5h5', 'g5h4']


def test_chess_fast_search_agrees_with_plain_minimax():
    def naive(board, move, n):
        board.push(move)
        try:
            if board.is_checkmate() or n == 1:
                return board.is_checkmate()
            replies = list(board.legal_moves)
            ok = bool(replies)
            for reply in replies:
                board.push(reply)
                ok = ok and any(naive(board, m, n - 1) for m in list(board.legal_moves))
                board.pop()
            return ok
        finally:
            board.pop()
    checked = mating = 0
    for seed in range(60):                                  # sparse endgames: small trees, many mates
        board = tasks._endgame(random.Random(seed))
        for move in board.legal_moves:
            for n in (1, 2):
                fast = tasks.forces_mate(board, move, n)
                assert fast == naive(board, move, n), (board.fen(), move, n)
                checked, mating = checked + 1, mating + fast
    assert mating > 20 and checked > 1000


def test_chess_checking_moves_match_python_chess():
    rng = random.Random(0)
    for game in range(20):
        board = chess.Board()
        while not board.is_game_over() and board.ply() < 120:
            want = sorted(m.uci() for m in board.legal_moves if board.gives_check(m))
            assert sorted(m.uci() for m in tasks.checking_moves(board)) == want, board.fen()
            moves = list(board.legal_moves)
            board.push(moves[int(rng.random() * len(moves))])


def test_chess_encoding_shows_the_side_to_move_as_white():
    board = chess.Board("4k3/8/8/8/8/8/4P3/4K2R b - - 0 1")        # black to move
    x = tasks.encode_board(board)
    assert x[chess.E1] == 6 and x[chess.E8] == 12                    # own king on e1 after mirroring
    assert x[chess.E7] == 7 and x[chess.H8] == 10                    # the opponent's pawn and rook, mirrored
    assert torch.equal(x, tasks.encode_board(board.mirror()))
    assert (x > 0).sum() == 4


@pytest.mark.parametrize('fen', ["r1bqkb1r/pppp1ppp/2n2n2/4p2Q/2B1P3/8/PPPP1PPP/RNB1K1NR w - - 0 1",
                                 "r1bqkb1r/pppp1ppp/2n2n2/4p2Q/2B1P3/8/PPPP1PPP/RNB1K1NR b - - 0 1",
                                 "8/1P4k1/8/8/8/8/5p2/K7 w - - 0 1", "8/1P4k1/8/8/8/8/5p2/K7 b - - 0 1"])
def test_chess_one_hot_logits_decode_to_their_move(fen):
    board = chess.Board(fen)
    for move in board.legal_moves:
        if move.promotion in (None, chess.QUEEN):
            logits = 10.0 * (tasks.encode_move(board, move) == 1).float()
            assert tasks.decode_move(logits, board) == move
    promotions = [m for m in board.legal_moves if m.promotion]
    for move in promotions:                                          # any promotion decodes to a queen
        logits = 10.0 * (tasks.encode_move(board, move) == 1).float()
        assert tasks.decode_move(logits, board).promotion == chess.QUEEN


@pytest.mark.parametrize('fen', ["r1bqkb1r/pppp1ppp/2n2n2/4p2Q/2B1P3/8/PPPP1PPP/RNB1K1NR b - - 0 1",
                                 "8/1P4k1/8/8/8/8/5p2/K7 w - - 0 1"])
def test_chess_legal_move_loss_is_a_softmax_over_legal_moves_whose_argmax_decodes(fen):
    board = chess.Board(fen)
    label = next(iter(board.legal_moves))
    y = tasks.encode_move(board, label)                              # (64, 64): 1 label, 0 legal, -100 illegal
    legal = {(tasks._frame(m.from_square, board), tasks._frame(m.to_square, board)) for m in board.legal_moves}
    assert {tuple(ij) for ij in (y >= 0).nonzero().tolist()} == legal
    def target(i, j):                                              # the same legal moves, (i, j) the answer
        t = y.clone()
        t[t == 1], t[i, j] = 0, 1
        return t
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(64, 64, requires_grad=True)
        tasks.Chess.loss(logits[None], y[None]).backward()
        assert (logits.grad[y == -100] == 0).all()                   # illegal moves get no probability, no gradient
        p = torch.stack([torch.exp(-tasks.choice_loss(logits.detach()[None], target(i, j)[None])) for i, j in sorted(legal)])
        assert p.sum().item() == pytest.approx(1.0, abs=1e-5)       # all the probability is on legal moves
        move = tasks.decode_move(logits.detach(), board)
        assert (tasks._frame(move.from_square, board), tasks._frame(move.to_square, board)) == sorted(legal)[int(p.argmax())]
        assert tasks.token_scores(logits.detach()[None], tasks.encode_move(board, move)[None])['exact'] == 1.0


def test_chess_file_mirror_augmentation_is_the_board_mirror():
    board = chess.Board("r1bqkb1r/pppp1ppp/2n2n2/4p2Q/2B1P3/8/PPPP1PPP/RNB1K1NR b - - 0 1")
    move = chess.Move.from_uci('c6d4')
    flipped = board.transform(chess.flip_horizontal)
    flipped_move = chess.Move(move.from_square ^ 7, move.to_square ^ 7)      # c6d4 -> f6e4
    assert flipped.is_legal(flipped_move)
    assert torch.equal(tasks.encode_board(board)[tasks.FLIP_FILES], tasks.encode_board(flipped))
    assert torch.equal(tasks.encode_move(board, move)[tasks.FLIP_FILES][:, tasks.FLIP_FILES], tasks.encode_move(flipped, flipped_move))


def test_chess_score_checks_mates_not_labels():
    task = tasks.Chess()
    fen = "6k1/5ppp/8/8/8/8/8/RR4K1 w - - 0 1"                      # Ra8# and Rb8# both mate
    board = chess.Board(fen)
    split = {'fen': [fen] * 3, 'move': ['a1a8'] * 3, 'depth': torch.tensor([1, 1, 1]), 'kind': ['endgame', 'playout', 'playout']}
    predicted = ['b1b8', 'a1a8', 'g1h1']                             # the other mate, the label, no mate
    logits = torch.stack([10.0 * (tasks.encode_move(board, chess.Move.from_uci(m)) == 1).float() for m in predicted])
    assert task.score(logits, split) == {'move': 2 / 3, 'label': 1 / 3, 'move_endgame': 1.0, 'move_playout': 0.5}
    assert not tasks.solves(board, chess.Move.from_uci('a1h8'), 1)    # illegal: the rook cannot get there
    assert tasks.solves(board, chess.Move.from_uci('b1b8'), 1)


def test_chess_bad_input_is_one_line_task_error():
    task = tasks.Chess()
    for bad in ('x', '0', '4', '2-1', '1,2', ''):
        with pytest.raises(tasks.TaskError):
            task.parse_difficulty(bad)
    assert task.parse_difficulty('1-2') == '1-2' and task.parse_difficulty('2-2') == '2'
    for fen in ('not a fen', '8/8/8/8/8/8/8/8 w - - 0 1', 'r3k3/8/8/8/8/8/8/4K3 b q - 0 1'):
        with pytest.raises(tasks.TaskError) as err:
            tasks.load_board(fen)
        assert '\n' not in str(err.value)
    split = {'fen': ['garbage'], 'move': ['a1a8'], 'depth': torch.tensor([1])}
    with pytest.raises(tasks.TaskError):
        task.score(torch.zeros(1, 64, 64), split)
    with pytest.raises(tasks.TaskError):
        tasks.decode_move(torch.zeros(64, 3), chess.Board())


def test_chess_shipped_puzzles_reverify_and_regenerate():
    streams = tasks.read_puzzle_file()
    assert {(1, 'train'), (2, 'train'), (1, 'test'), (2, 'test'), (3, 'test')} <= set(streams)
    for (depth, side), puzzles in streams.items():
        seeds, keys = [p['seed'] for p in puzzles], [p['key'] for p in puzzles]
        assert seeds == sorted(set(seeds)) and len(set(keys)) == len(keys)      # a prefix of the stream, no repeats
        rng = random.Random(depth)                                   # the first puzzles and a few drawn anywhere
        for p in puzzles[:2] + rng.sample(puzzles, 3 if depth < 3 else 1):
            board = tasks.load_board(p['fen'])
            assert tasks.solve_puzzle(board, depth).uci() == p['move']
            assert tasks.puzzles_at(p['seed'], ((depth, side),))[(depth, side)] == p
    first = streams[(1, 'train')][:4]                                # and the stream, seed by seed
    assert tasks.generate_puzzles({(1, 'train'): 4}, workers=1)[(1, 'train')] == first


def test_chess_train_and_test_share_no_game():
    streams = tasks.read_puzzle_file()
    seeds = {side: {p['seed'] for (d, s), ps in streams.items() if s == side for p in ps} for side in ('train', 'test')}
    keys = {side: {p['key'] for (d, s), ps in streams.items() if s == side for p in ps} for side in ('train', 'test')}
    assert seeds['train'] and seeds['test'] and not seeds['train'] & seeds['test']     # no game feeds both sides
    assert not keys['train'] & keys['test']                                          # nor does any position
    both = {(d, side) for d in (1, 2, 3) for side in ('train', 'test')}
    for seed in range(40):                                           # a seed's puzzles all land on one side
        assert len({side for _, side in tasks.puzzles_at(seed, both)}) <= 1


def test_chess_generation_progress_sees_prefixes_of_the_streams():
    """What write_puzzle_file saves while it runs (so a stopped run keeps its puzzles) is a prefix of each stream."""
    seen = []
    out = tasks.generate_puzzles({(1, 'train'): 6}, workers=1, progress=lambda s: seen.append(list(s[(1, 'train')])))
    assert len(seen) > 1 and seen[-1] == out[(1, 'train')] and all(s == out[(1, 'train')][:len(s)] for s in seen)


def test_chess_puzzle_file_round_trip_and_edits_are_refused(tmp_path, capsys):
    path = str(tmp_path / 'puzzles.txt')
    tasks.write_puzzle_file({(1, 'train'): 3, (1, 'test'): 1}, path=path, workers=1)
    streams = tasks.read_puzzle_file(path)
    assert streams == tasks.generate_puzzles({(1, 'train'): 3, (1, 'test'): 1}, workers=1)
    text = open(path).read()
    open(path, 'w').write(text.replace(';train;', ';test;', 1))          # an edit: the checksum no longer matches
    assert tasks.read_puzzle_file(path) == {} and 'ignoring' in capsys.readouterr().out


def test_chess_generation_does_not_depend_on_worker_count():
    wanted = {(1, 'test'): 3, (2, 'train'): 2}
    assert tasks.generate_puzzles(wanted, workers=1) == tasks.generate_puzzles(wanted, workers=2)


def test_chess_batches_deterministic_and_test_pool_disjoint(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, 'CACHE_DIR', str(tmp_path))
    task = tasks.Chess()
    task.train_pool, task.test_pool = 60, 20
    x1, y1 = task.train_batch('1-2', 32, torch.Generator().manual_seed(0))
    x2, y2 = task.train_batch('1-2', 32, torch.Generator().manual_seed(0))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (32, 64) and y1.shape == (32, 64, 64)
    assert ((y1 == 1).sum((1, 2)) == 1).all() and ((y1 == 0).sum((1, 2)) > 0).all()   # one answer among legal moves
    for x, y in zip(x1[:4], y1[:4]):                                 # mirrored or not, the marks are the board's legal moves
        board = chess.Board(None)
        for sq, t in enumerate(x.tolist()):
            if t:
                board.set_piece_at(sq, chess.Piece((t - 1) % 6 + 1, t <= 6))
        assert torch.equal(y >= 0, tasks.encode_move(board, next(iter(board.legal_moves))) >= 0)
    split = task.eval_set('1-2', 30, seed=3)
    assert split['x'].shape == (30, 64) and set(split['depth'].tolist()) == {1, 2}
    assert torch.equal(split['x'], task.eval_set('1-2', 30, seed=3)['x'])
    train_x = task.pools('1-2', 'train', 60)['x']                      # what train_batch draws from, both mirrors
    train = {tuple(r) for r in torch.cat([train_x, train_x[:, tasks.FLIP_FILES]]).tolist()}
    assert not train & {tuple(r) for r in split['x'].tolist()}


def test_chess_corrupt_cache_is_regenerated(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tasks, 'CACHE_DIR', str(tmp_path))
    first = tasks.chess_pool(1, 'train', 10)
    [path] = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:-50] + b'x' * 50)
    again = tasks.chess_pool(1, 'train', 10)
    assert 'regenerating' in capsys.readouterr().out
    assert again['fen'] == first['fen'] and torch.equal(again['y'], first['y'])


def test_train_py_runs_chess_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv('LOOPED_CACHE', str(tmp_path / 'cache'))
    out = run_script('train.py', '--task', 'chess', '--max_steps', '2', '--d_model', '16', '--n_head', '2', '--n_iters', '2',
                     '--batch_size', '8', '--eval_n', '8', '--eval_difficulties', '1,2', '--eval_mults', '0.5,1',
                     '--eval_interval', '0', '--log_interval', '1', '--out_dir', str(tmp_path / 'run'))
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'move accuracy' in out.stdout and (tmp_path / 'run' / 'eval.json').exists()
