"""pytest suite: CPU only, a few minutes. Run with `python -m pytest -q`."""

import itertools
import os
import random
import subprocess
import sys

import chess
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


# ---- chess

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
            logits = 10.0 * torch.nn.functional.one_hot(tasks.encode_move(board, move), 3).float()
            assert tasks.decode_move(logits, board) == move
    promotions = [m for m in board.legal_moves if m.promotion]
    for move in promotions:                                          # any promotion decodes to a queen
        logits = 10.0 * torch.nn.functional.one_hot(tasks.encode_move(board, move), 3).float()
        assert tasks.decode_move(logits, board).promotion == chess.QUEEN


def test_chess_file_mirror_augmentation_is_the_board_mirror():
    board = chess.Board("r1bqkb1r/pppp1ppp/2n2n2/4p2Q/2B1P3/8/PPPP1PPP/RNB1K1NR b - - 0 1")
    move = chess.Move.from_uci('c6d4')
    flipped = board.transform(chess.flip_horizontal)
    flipped_move = chess.Move(move.from_square ^ 7, move.to_square ^ 7)      # c6d4 -> f6e4
    assert flipped.is_legal(flipped_move)
    assert torch.equal(tasks.encode_board(board)[tasks.FLIP_FILES], tasks.encode_board(flipped))
    assert torch.equal(tasks.encode_move(board, move)[tasks.FLIP_FILES], tasks.encode_move(flipped, flipped_move))


def test_chess_score_checks_mates_not_labels():
    task = tasks.Chess()
    fen = "6k1/5ppp/8/8/8/8/8/RR4K1 w - - 0 1"                      # Ra8# and Rb8# both mate
    board = chess.Board(fen)
    split = {'fen': [fen] * 3, 'move': ['a1a8'] * 3, 'depth': torch.tensor([1, 1, 1]), 'kind': ['endgame', 'playout', 'playout']}
    predicted = ['b1b8', 'a1a8', 'g1h1']                             # the other mate, the label, no mate
    logits = torch.stack([10.0 * torch.nn.functional.one_hot(tasks.encode_move(board, chess.Move.from_uci(m)), 3).float()
                          for m in predicted])
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
        task.score(torch.zeros(1, 64, 3), split)


def test_chess_shipped_puzzles_reverify_and_regenerate():
    streams = tasks.read_puzzle_file()
    assert {(1, 'train'), (2, 'train'), (1, 'test'), (2, 'test'), (3, 'test')} <= set(streams)
    train_keys = {p['key'] for (d, side), ps in streams.items() if side == 'train' for p in ps}
    for (depth, side), puzzles in streams.items():
        seeds, keys = [p['seed'] for p in puzzles], [p['key'] for p in puzzles]
        assert seeds == sorted(set(seeds)) and len(set(keys)) == len(keys)      # a prefix of the stream, no repeats
        assert all(tasks.key_side(k) == side for k in keys)
        if side == 'test':
            assert not train_keys & set(keys)
        for p in (puzzles[:2] if depth < 3 else puzzles[:1]):
            board = tasks.load_board(p['fen'])
            assert tasks.solve_puzzle(board, depth).uci() == p['move']
            assert tasks.puzzles_at(p['seed'], ((depth, side),))[(depth, side)] == p
    first = streams[(1, 'train')][:4]                                # and the stream, seed by seed
    assert tasks.generate_puzzles({(1, 'train'): 4}, workers=1)[(1, 'train')] == first


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
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (32, 64)
    assert ((y1 == 1).sum(1) == 1).all() and ((y1 == 2).sum(1) == 1).all()
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
                     '--batch_size', '8', '--eval_n', '8', '--eval_difficulties', '1,2', '--eval_iters', '1,2',
                     '--eval_interval', '0', '--log_interval', '1', '--out_dir', str(tmp_path / 'run'))
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'move accuracy' in out.stdout and (tmp_path / 'run' / 'eval.json').exists()
