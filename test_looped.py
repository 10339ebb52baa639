"""pytest suite: CPU only, a few minutes. Run with `python -m pytest -q`."""

import itertools
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import chess
import pytest
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend

from looped import LoopedConfig, LoopedTransformer, CheckpointError, RECALLS, INNER_NORMS, local_attention, window_mask
import analyze
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


def test_pair_head_scores_token_pairs():
    model = LoopedTransformer(tiny_config(pair_head=True)).eval()
    idx = torch.randint(0, 2, (3, 8))
    logits = model(idx, n_iters=2)
    assert logits.shape == (3, 8, 8)
    e = model.embed(idx)
    h = model.step(model.step(model.initial_state(e), e), e)
    q, k = model.head(model.ln_f(h)).chunk(2, -1)
    assert torch.allclose(logits[1, 2, 5], q[1, 2] @ k[1, 5] / 16 ** 0.5, atol=1e-6)


@pytest.mark.parametrize('recall,inner,outer', list(itertools.product(RECALLS, INNER_NORMS, (True, False))))
def test_every_variant_trains(recall, inner, outer):
    """60 Adam steps on one fixed batch halve the progressive loss, for all 18 variants. The target,
    the previous bit, needs attention and positions, so every part of the block must learn."""
    torch.manual_seed(0)
    model = LoopedTransformer(tiny_config(recall=recall, inner_norm=inner, outer_norm=outer))
    loss_fn = train.ProgressiveLoss(model, alpha=0.5, tbptt=0)
    x = torch.randint(0, 2, (16, 6), generator=torch.Generator().manual_seed(0))
    y = torch.cat((torch.full((16, 1), -100), x[:, :-1]), 1)            # y_i = x_{i-1}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = loss_fn(x, y, 1, 2)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_n_iters_counts_block_applications():
    model = LoopedTransformer(tiny_config())
    calls = []
    model.block.register_forward_hook(lambda *args: calls.append(1))
    idx = torch.randint(0, 2, (2, 8))
    for n in (1, 4, 7):
        calls.clear()
        model(idx, n_iters=n)
        assert len(calls) == n
    calls.clear()
    model(idx)
    assert len(calls) == model.cfg.n_iters


def test_default_iteration_rule_scales_with_length():
    model = LoopedTransformer(tiny_config(scale_iters=True, n_iters=3, block_size=8))
    assert model.default_iters(8) == 3 and model.default_iters(4) == 2 and model.default_iters(1) == 1
    assert model.default_iters(16) == 6 and model.default_iters(20) == 8
    assert LoopedTransformer(tiny_config(scale_iters=False)).default_iters(64) == 3


@pytest.mark.parametrize('recall', RECALLS)
def test_recall_decides_whether_an_iteration_reads_the_input(recall):
    """From the same state, a no-recall step gives the same next state for two different inputs;
    a recall step (standard or internal) does not."""
    torch.manual_seed(0)
    model = LoopedTransformer(tiny_config(recall=recall))
    h = torch.randn(1, 8, 16)
    e1, e2 = model.embed(torch.zeros(1, 8, dtype=torch.long)), model.embed(torch.ones(1, 8, dtype=torch.long))
    same = torch.allclose(model.step(h, e1), model.step(h, e2))
    assert same == (recall == 'none')


def test_progressive_loss_matches_plain_forward():
    """With alpha = 0 the loss is CE of the T-iteration output; with alpha = 1, of n + k iterations."""
    torch.manual_seed(0)
    model = LoopedTransformer(tiny_config())
    x, y = tasks.PrefixSums().train_batch(8, 4, torch.Generator().manual_seed(1))
    ce = lambda logits: torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert torch.allclose(train.ProgressiveLoss(model, 0.0, 0)(x, y, 1, 1)[0], ce(model(x, n_iters=3)))
    assert torch.allclose(train.ProgressiveLoss(model, 1.0, 0)(x, y, 1, 2)[0], ce(model(x, n_iters=3)))
    assert torch.allclose(train.ProgressiveLoss(model, 0.0, 2)(x, y, 1, 1, extra=2)[0], ce(model(x, n_iters=5)))  # overrun
    scaled = LoopedTransformer(tiny_config(scale_iters=True, n_iters=4, block_size=8))   # 1 iteration per 2 tokens
    x4 = torch.randint(0, 2, (4, 4))
    y4 = x4.cumsum(1) % 2
    ce4 = torch.nn.functional.cross_entropy(scaled(x4, n_iters=2).flatten(0, 1), y4.flatten())
    assert torch.allclose(train.ProgressiveLoss(scaled, 0.0, 0)(x4, y4, 0, 1)[0], ce4)   # training follows the rule


def test_causal_model_does_not_look_ahead():
    torch.manual_seed(0)
    model = LoopedTransformer(tiny_config(causal=True))
    a = torch.randint(0, 2, (1, 8))
    b = a.clone()
    b[0, 5:] = 1 - b[0, 5:]
    assert torch.allclose(model(a)[0, :5], model(b)[0, :5], atol=1e-6)
    assert not torch.allclose(model(a)[0, 5:], model(b)[0, 5:])


@pytest.mark.parametrize('causal', [True, False])
def test_local_attention_equals_masked_dense_attention(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 29, 8).unbind(0)   # (B, H, T, hd) each
    for window in (1, 2, 5):
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(29, window, causal))
        assert torch.allclose(local_attention(q, k, v, window, causal), dense, atol=1e-5)


def test_rope_model_runs_past_training_length_and_learned_does_not():
    assert LoopedTransformer(tiny_config(pos='rope'))(torch.zeros(1, 40, dtype=torch.long)).shape == (1, 40, 2)
    with pytest.raises(ValueError, match='exceeds block_size'):
        LoopedTransformer(tiny_config(pos='learned'))(torch.zeros(1, 40, dtype=torch.long))


@pytest.mark.parametrize('bad', [dict(recall='bogus'), dict(inner_norm='mid'), dict(d_model=15), dict(n_iters=0),
                                 dict(recall='none', init_state='zeros'), dict(recall='none', init_state='noise')])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        LoopedTransformer(tiny_config(**bad))


def sudoku_model(**kw):
    cfg = dict(vocab_size=10, n_classes=9, block_size=81, pos='learned', causal=False, graph='sudoku', d_model=16, n_head=2,
               n_iters=3, recall='internal')
    return LoopedTransformer(LoopedConfig(**{**cfg, **kw}))


def test_sudoku_graph_confines_one_iteration_to_peers():
    """After one iteration, cell (4, 4) reads its row, column and box peers and nothing else."""
    torch.manual_seed(0)
    model = sudoku_model()
    x = torch.randint(0, 10, (1, 81), generator=torch.Generator().manual_seed(0))
    base = model(x, n_iters=1)[0, 40]
    for cell in range(81):
        changed = x.clone()
        changed[0, cell] = (changed[0, cell] + 1) % 10
        peer = cell // 9 == 4 or cell % 9 == 4 or (cell // 27 == 1 and cell % 9 // 3 == 1)
        assert torch.equal(model(changed, n_iters=1)[0, 40], base) == (not peer), cell
    far = x.clone()
    far[0, 0] = (far[0, 0] + 1) % 10                    # (0, 0) is no peer of (4, 4), but a peer of its peer (0, 4)
    assert torch.equal(model(far, n_iters=1)[0, 40], base) and not torch.equal(model(far, n_iters=2)[0, 40], model(x, n_iters=2)[0, 40])


def test_chess_graph_is_lines_and_knight_jumps():
    allowed = LoopedTransformer(tiny_config(vocab_size=13, n_classes=3, block_size=64, causal=False, graph='chess')).block.attn.mask(64, 'cpu')
    e4 = chess.E4
    sees = {sq for sq in range(64) if allowed[e4, sq]}
    board = chess.BaseBoard(None)
    board.set_piece_at(e4, chess.Piece(chess.QUEEN, chess.WHITE))
    lines = set(board.attacks(e4))                        # empty board: every square on e4's lines
    board.set_piece_at(e4, chess.Piece(chess.KNIGHT, chess.WHITE))
    assert sees == lines | set(board.attacks(e4)) | {e4}
    assert torch.equal(allowed, allowed.T)


def test_chess_local_graph_is_king_steps_and_knight_jumps():
    """chess_local: a square sees what a king or a knight on it would attack, and itself (checked on
    a corner, an edge and a centre square against python-chess's own attack sets)."""
    allowed = LoopedTransformer(tiny_config(vocab_size=13, n_classes=3, block_size=64, causal=False, graph='chess_local')).block.attn.mask(64, 'cpu')
    for sq in (chess.A1, chess.H5, chess.E4):
        board = chess.BaseBoard(None)
        board.set_piece_at(sq, chess.Piece(chess.KING, chess.WHITE))
        king = set(board.attacks(sq))
        board.set_piece_at(sq, chess.Piece(chess.KNIGHT, chess.WHITE))
        assert {j for j in range(64) if allowed[sq, j]} == king | set(board.attacks(sq)) | {sq}
    assert torch.equal(allowed, allowed.T)


def test_board_bias_depends_only_on_the_board_offset():
    """board_bias: one learned number per head and (row, column) offset, added to the attention
    scores of every square pair at that offset and nowhere else; off the graph stays -inf."""
    model = LoopedTransformer(tiny_config(vocab_size=13, n_classes=3, block_size=64, causal=False, graph='chess', board_bias=True))
    attn = model.block.attn
    offsets = attn.offsets
    assert offsets[chess.A1, chess.B3] == offsets[chess.E4, chess.F6] != offsets[chess.B3, chess.A1]   # a knight jump (+2, +1)
    with torch.no_grad():
        attn.board_bias[1, offsets[chess.E4, chess.F6]] = 5.0
    allowed = attn.mask(64, 'cpu')
    biased = attn.biased(allowed)
    assert biased.shape == (1, attn.n_head, 64, 64)
    mask = biased[0]
    assert torch.isneginf(mask[:, ~allowed]).all()
    five = (mask[1] == 5.0)
    assert five.sum() == 6 * 7 and five[chess.A1, chess.B3] and five[chess.G6, chess.H8]   # every (+2, +1) pair on the board
    assert (mask[0][allowed] == 0).all() and (mask[1][allowed & ~five] == 0).all()
    x = torch.randn(1, 64, attn.qkv.in_features)
    before = attn(x)
    with torch.no_grad():
        attn.board_bias[1] = 0.0
    assert not torch.allclose(before, attn(x))                    # the forward pass uses it
    with pytest.raises(ValueError, match="board_bias needs a board"):
        LoopedConfig(board_bias=True).validate()


def test_attention_graph_must_fit_the_input():
    with pytest.raises(ValueError, match="graph 'sudoku' is drawn for 81 tokens"):
        LoopedTransformer(tiny_config(graph='sudoku', pos='rope'))(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="graph 'chess' is drawn for 64 tokens, but block_size is 8"):
        LoopedConfig(block_size=8, pos='learned', graph='chess').validate()
    with pytest.raises(ValueError, match='unknown graph'):
        LoopedConfig(graph='hexagonal').validate()


def test_halting_rule_runs_each_example_to_its_own_fixed_point():
    """model(idx) with halt_tol: n_iters, then each example on until its relative residual falls
    below halt_tol or the cap; its logits are those of exactly that many iterations. Only idx is read."""
    torch.manual_seed(0)
    model = sudoku_model(halt_tol=1e-2, max_iters=12).eval()
    x = torch.randint(0, 10, (6, 81), generator=torch.Generator().manual_seed(1))
    logits, used = model.run(x)
    assert ((3 <= used) & (used <= 12)).all()
    for i in range(6):
        assert torch.allclose(logits[i], model(x[i:i + 1], n_iters=int(used[i]))[0], atol=1e-5)
        e = model.embed(x[i:i + 1])
        h = [model.initial_state(e)]
        for _ in range(int(used[i])):
            h.append(model.step(h[-1], e))
        moved = [((b - a).norm() / a.norm()).item() for a, b in zip(h[:-1], h[1:])]
        stopped = moved[-1] < 1e-2 and all(m >= 1e-2 for m in moved[3:-1])
        assert stopped or used[i] == 12, (i, moved)
    assert torch.equal(model(x), logits)
    assert torch.equal(model.run(x, n_iters=5)[1], torch.full((6,), 5))       # n_iters given: exactly that many
    assert sudoku_model(halt_tol=1e-9, max_iters=0).max_iters(81) == 24          # cap default: 8 x n_iters


def test_graph_and_halting_rule_survive_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv('LOOPED_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('LOOPED_SUDOKU_POOL', '4')
    train.main(['--task', 'sudoku', '--out_dir', str(tmp_path), '--max_steps', '1', '--batch_size', '2', '--d_model', '16',
                '--n_head', '2', '--n_iters', '2', '--eval_n', '2', '--eval_difficulties', 'r1-4', '--halt_tol', '0.05',
                '--max_iters', '7'])
    model = LoopedTransformer.from_checkpoint(tmp_path / 'ckpt.pt')
    assert (model.cfg.graph, model.cfg.halt_tol, model.cfg.max_iters) == ('sudoku', 0.05, 7)
    assert model.block.attn.mask(81, 'cpu').sum().item() == 81 * 21


# ------------------------------------------------------------------------------------------ tasks

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


# ------------------------------------------------------------------------------------------ checkpoints

def quick_args(out_dir, *extra):
    return ['--task', 'prefix_sums', '--out_dir', str(out_dir), '--d_model', '16', '--n_head', '2', '--n_iters', '3',
            '--batch_size', '8', '--train_difficulty', '8', '--eval_n', '8', '--eval_difficulties', '8,16',
            '--eval_mults', '1', '--log_interval', '1', '--eval_interval', '0', '--warmup_steps', '2', *extra]


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    train.main(quick_args(tmp_path, '--max_steps', '3'))
    model = LoopedTransformer.from_checkpoint(tmp_path / 'ckpt.pt')
    assert not model.training
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    again = LoopedTransformer(model.cfg)
    again.load_state_dict(ckpt['model'])
    idx = torch.randint(0, 2, (4, 12))
    assert torch.equal(model(idx), again.eval()(idx))
    assert ckpt['step'] == 3 and (tmp_path / 'eval.json').exists()


def test_missing_and_corrupt_checkpoints_raise_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match='no checkpoint at'):
        LoopedTransformer.from_checkpoint(tmp_path / 'nope.pt')
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        LoopedTransformer.from_checkpoint(bad)
    train.main(quick_args(tmp_path, '--max_steps', '1'))
    good = (tmp_path / 'ckpt.pt').read_bytes()
    (tmp_path / 'cut.pt').write_bytes(good[:len(good) // 2])
    with pytest.raises(CheckpointError) as err:
        LoopedTransformer.from_checkpoint(tmp_path / 'cut.pt')
    assert '\n' not in str(err.value)


@pytest.mark.parametrize('args,message', [
    (['--recall', 'bogus'], 'unknown recall'),
    (['--task', 'nope'], 'unknown task'),
    (['--d_model', '30', '--n_head', '4'], 'not divisible'),
    (['--outer_norm', 'maybe'], 'expected true or false'),
    (['--no_such_flag', '1'], 'unrecognized arguments'),
    (['--resume'], 'cannot resume'),
])
def test_bad_flags_exit_with_one_line(tmp_path, args, message):
    result = run_script('train.py', '--out_dir', str(tmp_path / 'run'), '--max_steps', '1', *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and 'Traceback' not in result.stderr


# ------------------------------------------------------------------------------------------ robustness

def logged_losses(stdout):
    return [float(line.split('| loss ')[1].split()[0]) for line in stdout.splitlines() if line.startswith('step ')]


def weights(path):
    return torch.load(path, weights_only=True)['model']


def start_and_interrupt(args, ckpt, sig):
    """Start train.py, wait for its first checkpoint, then send `sig`; returns the finished process."""
    import signal as _signal
    import time
    proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc, out, err


@pytest.mark.parametrize('sig_name', ['SIGKILL', 'SIGINT'])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, sig_name):
    """kill -9 (resume from the periodic checkpoint) or Ctrl-C (saves, exits 130), then --resume:
    the final weights equal those of an uninterrupted run, bit for bit, and so do the logged losses."""
    import signal as _signal
    args = lambda d: quick_args(tmp_path / d, '--max_steps', '60', '--ckpt_interval', '5', '--eval_n', '4', '--eval_difficulties', '8')
    full = run_script('train.py', *args('full'))
    assert full.returncode == 0, full.stderr
    proc, out, err = start_and_interrupt(args('cut'), tmp_path / 'cut' / 'ckpt.pt', getattr(_signal, sig_name))
    if sig_name == 'SIGINT':
        assert proc.returncode == 130 and 'interrupted: saved step' in out
    cut_step = torch.load(tmp_path / 'cut' / 'ckpt.pt', weights_only=True)['step']
    assert 0 < cut_step < 60, 'the run must be cut before its end for this test to mean anything'
    resumed = run_script('train.py', *args('cut'), '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert f'resuming' in resumed.stdout
    a, b = weights(tmp_path / 'full' / 'ckpt.pt'), weights(tmp_path / 'cut' / 'ckpt.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(full.stdout)[cut_step:] == logged_losses(resumed.stdout)


def test_same_seed_same_losses(tmp_path):
    one = run_script('train.py', *quick_args(tmp_path / 'a', '--max_steps', '5'))
    two = run_script('train.py', *quick_args(tmp_path / 'b', '--max_steps', '5'))
    assert logged_losses(one.stdout) == logged_losses(two.stdout) and len(logged_losses(one.stdout)) == 5


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """Force the loss to NaN at the 7th step: the run stops with a one-line message naming the
    last checkpoint (step 6), which is left intact and loadable."""
    calls = []
    original = train.ProgressiveLoss.forward

    def diverging(self, *args, **kw):
        calls.append(1)
        loss, *rest = original(self, *args, **kw)
        return (loss * float('nan') if len(calls) >= 7 else loss, *rest)
    monkeypatch.setattr(train.ProgressiveLoss, 'forward', diverging)
    with pytest.raises(SystemExit) as err:
        train.main(quick_args(tmp_path, '--max_steps', '20', '--ckpt_interval', '3'))
    assert 'loss is nan at step 6' in str(err.value) and 'step 6' in str(err.value).split('checkpoint')[1]
    model = LoopedTransformer.from_checkpoint(tmp_path / 'ckpt.pt')
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_with_a_different_config_is_refused(tmp_path):
    train.main(quick_args(tmp_path, '--max_steps', '2'))
    for extra, field in ((['--d_model', '32'], 'd_model'), (['--lr', '0.5'], 'lr')):
        result = run_script('train.py', *quick_args(tmp_path, '--max_steps', '4', '--resume', *extra))
        assert result.returncode != 0 and field in result.stderr and len(result.stderr.strip().splitlines()) == 1
    again = run_script('train.py', *quick_args(tmp_path, '--max_steps', '4'))
    assert again.returncode != 0 and 'already exists' in again.stderr


BAD_FLAGS = [['--lr', '-1'], ['--beta2', '1'], ['--grad_clip', '-1'], ['--log_interval', '0'], ['--seed', str(2 ** 64)],
             ['--vocab_size', '1'], ['--eval_mults', 'abc'], ['--eval_mults', 'nan'], ['--eval_mults', '0'], ['--eval_batch', '0'],
             ['--pos', 'learned', '--eval_difficulties', '8,32'], ['--device', 'foo'], ['--n_iters', '100000000'],
             ['--eval_mults', '1e12'], ['--weight_decay', '-1']]


def test_bad_flags_are_refused_before_anything_is_built_or_written(tmp_path):
    """Every flag is checked up front: a one-line error, no out_dir made, and an existing run
    untouched even with --overwrite."""
    train.main(quick_args(tmp_path / 'old', '--max_steps', '1'))
    before = {f: (tmp_path / 'old' / f).read_bytes() for f in ('ckpt.pt', 'eval.json')}
    for args in BAD_FLAGS:
        for out_dir, extra in ((tmp_path / 'new', []), (tmp_path / 'old', ['--overwrite'])):
            with pytest.raises(SystemExit) as err:
                train.main(quick_args(out_dir, *args, *extra))
            assert str(err.value).startswith('train.py: error: ') and '\n' not in str(err.value), (args, err.value)
    assert not (tmp_path / 'new').exists()
    assert before == {f: (tmp_path / 'old' / f).read_bytes() for f in ('ckpt.pt', 'eval.json')}


@pytest.mark.parametrize('script,args', [
    ('analyze', ['ckpt.pt', '--eps', '0']), ('analyze', ['ckpt.pt', '--halt_tol', '-1']), ('analyze', ['ckpt.pt', '--max_cost', '-1']),
    ('analyze', ['ckpt.pt', '--device', 'foo']), ('analyze', ['ckpt.pt', '--json', '/no/such/folder/d.json']),
    ('bench', ['step', '--rounds', '0']), ('bench', ['step', '--device', 'foo']), ('bench', ['step', '--configs', 'readme,nope']),
])
def test_analyze_and_bench_flags_are_checked_up_front(script, args):
    module = analyze if script == 'analyze' else __import__('bench')
    with pytest.raises(SystemExit) as err:
        module.parse_args(args)
    assert str(err.value).startswith(f'{script}.py: error: ') and '\n' not in str(err.value)


def test_non_finite_final_state_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    """The last step turns the weights NaN (the loss it reported was finite): the end-of-run save
    refuses, the run stops with one line, and the good checkpoint of step 2 stays byte for byte."""
    train.main(quick_args(tmp_path, '--max_steps', '2'))
    good = (tmp_path / 'ckpt.pt').read_bytes()
    step = torch.optim.AdamW.step

    def poisoned(self, *args, **kw):
        out = step(self, *args, **kw)
        if self.state[self.param_groups[0]['params'][0]]['step'] == 4:
            for group in self.param_groups:
                for p in group['params']:
                    p.data.fill_(math.nan)
        return out
    monkeypatch.setattr(torch.optim.AdamW, 'step', poisoned)
    with pytest.raises(SystemExit) as err:
        train.main(quick_args(tmp_path, '--max_steps', '4', '--resume'))
    assert 'not finite at step 4' in str(err.value) and 'step 2' in str(err.value)
    assert (tmp_path / 'ckpt.pt').read_bytes() == good and not (tmp_path / 'run.lock').exists()


def test_a_claimed_out_dir_is_refused_and_a_stale_claim_taken_over(tmp_path):
    import socket
    (tmp_path / 'run.lock').write_text(f'{socket.gethostname()} {os.getpid()}')    # a live run: this process
    with pytest.raises(SystemExit) as err:
        train.main(quick_args(tmp_path, '--max_steps', '1'))
    assert f'in use by another run (pid {os.getpid()}' in str(err.value) and not (tmp_path / 'ckpt.pt').exists()
    assert (tmp_path / 'run.lock').exists()                                          # the other run's claim stays
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / 'run.lock').write_text(f'{socket.gethostname()} {dead.pid}')         # its run died without releasing
    train.main(quick_args(tmp_path, '--max_steps', '1'))
    assert (tmp_path / 'ckpt.pt').exists() and not (tmp_path / 'run.lock').exists()


def test_unreadable_checkpoints_give_one_line_everywhere(tmp_path):
    """An empty file, a checkpoint without optimizer state and one whose weights do not fit its
    config: one whole line from from_checkpoint, train --resume and analyze.py."""
    train.main(quick_args(tmp_path / 'good', '--max_steps', '1'))
    ckpt = torch.load(tmp_path / 'good' / 'ckpt.pt', weights_only=True)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'ckpt.pt').write_bytes(b'')
    (tmp_path / 'noopt').mkdir()
    torch.save({k: v for k, v in ckpt.items() if k != 'optimizer'}, tmp_path / 'noopt' / 'ckpt.pt')
    (tmp_path / 'mismatch').mkdir()
    ckpt['model']['tok_emb.weight'] = torch.zeros(3, 32)
    torch.save(ckpt, tmp_path / 'mismatch' / 'ckpt.pt')
    for name, words in (('empty', 'empty'), ('noopt', 'no training state'), ('mismatch', 'do not match')):
        path = tmp_path / name / 'ckpt.pt'
        with pytest.raises(SystemExit) as err:
            train.main(quick_args(tmp_path / name, '--max_steps', '2', '--resume'))
        assert words in str(err.value) and '\n' not in str(err.value), err.value
        if name != 'noopt':                                                          # its weights load fine
            with pytest.raises(CheckpointError, match=words) as err:
                LoopedTransformer.from_checkpoint(path)
            with pytest.raises(SystemExit) as err:
                analyze.main([str(path)])
            assert words in str(err.value) and '\n' not in str(err.value)


@pytest.mark.parametrize('bad,words', [
    (torch.zeros(5, dtype=torch.long), 'shape'), (torch.zeros(1, 2, 3, dtype=torch.long), 'shape'), ([[0, 1, 1]], 'LongTensor'),
    (np.zeros((2, 3), dtype=np.int64), 'LongTensor'), (torch.zeros(2, 3), 'LongTensor'), (torch.full((2, 3), 2), 'token ids'),
])
def test_model_call_checks_its_input(bad, words):
    model = LoopedTransformer(tiny_config())
    with pytest.raises((TypeError, ValueError), match=words):
        model(bad)
    idx = torch.zeros(2, 3, dtype=torch.long)
    for n in (-3, 2.5, 10 ** 9):
        with pytest.raises(ValueError, match='n_iters'):
            model(idx, n_iters=n)
    assert model(idx.int(), n_iters=0).shape == (2, 3, 2)


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo), each on half of the same global batch, logs the same
    losses and ends at the same weights as one process (to float round-off)."""
    one = run_script('train.py', *quick_args(tmp_path / 'one', '--max_steps', '8'))
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py',
                          *quick_args(tmp_path / 'two', '--max_steps', '8', '--device', 'cpu')],
                         cwd=HERE, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert 'x2' in two.stdout
    l1, l2 = logged_losses(one.stdout), logged_losses(two.stdout)
    assert len(l1) == len(l2) == 8 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    a, b = weights(tmp_path / 'one' / 'ckpt.pt'), weights(tmp_path / 'two' / 'ckpt.pt')
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


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


# ------------------------------------------------------------------------------------------ analyze


def linear_toy(B=3, N=24, P=12, seed=0):
    """F(h, x) = A_b h + C_b x per example b (float64), with A_b = S D S^{-1} non-normal: a dominant
    complex pair r_b e^{+-i theta_b}, every other eigenvalue inside |z| <= 0.5. Shapes h (B, 4, N/4), x (B, 4, P/4).
    analyze stacks, perturbs and subsets rows, so F finds each row's b from its input."""
    g = torch.Generator().manual_seed(seed)
    radii, A = [0.9, 0.8, 0.85][:B], []
    for r, theta in zip(radii, (0.7, 2.0, 1.2)):
        D = torch.diag(torch.rand(N, generator=g, dtype=torch.float64) - 0.5)
        D[:2, :2] = r * torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
        S = torch.eye(N, dtype=torch.float64) + 0.3 * torch.randn(N, N, generator=g, dtype=torch.float64) / N ** 0.5
        A.append(S @ D @ torch.linalg.inv(S))
    A, C = torch.stack(A), torch.randn(B, N, P, generator=g, dtype=torch.float64) / P ** 0.5
    x = torch.randn(B, 4, P // 4, generator=g, dtype=torch.float64)
    which = lambda x_: torch.cdist(x_.flatten(1), x.flatten(1)).argmin(1)   # a row's example: the nearest input
    F = lambda h, x_: (A[which(x_)] @ h.flatten(1)[..., None] + C[which(x_)] @ x_.flatten(1)[..., None]).view_as(h)
    return F, A, C, x, torch.tensor(radii, dtype=torch.float64)


def test_analyze_linear_toy_matches_exact_linear_algebra():
    F, A, C, x, radii = linear_toy()
    B, N = A.shape[:2]
    h0 = torch.zeros(B, 4, N // 4, dtype=torch.float64)
    h, res, _, _ = analyze.iterate(F, h0, x, 500)
    h_exact = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - A, C @ x.flatten(1)[..., None])[..., 0]
    assert torch.allclose(h.flatten(1), h_exact, atol=1e-10) and res[-1].max() < 1e-12
    assert torch.allclose(torch.linalg.eigvals(A).abs().max(1).values, radii)        # the toy is what it claims
    _, _, h_halt, t_halt = analyze.iterate(F, h0, x, 500, halt_tol=1e-6)               # adaptive halting
    for b, t in enumerate(t_halt.tolist()):
        assert res[t - 1, b] < 1e-6 <= res[:t - 1, b].min()
        assert torch.equal(h_halt[b], analyze.iterate(F, h0, x, t)[0][b])
    h_u, res_u = analyze.iterate(F, h0, x, 500, until=1e-8, min_iters=5)[:2]             # each example stops on its own
    stops = [next(t for t in range(5, len(res_u) + 1) if res_u[t - 1, b] < 1e-8) for b in range(B)]
    assert len(set(stops)) == B and max(stops) == len(res_u)                             # the toy's radii differ
    for b, t in enumerate(stops):
        assert torch.allclose(h_u[b], analyze.iterate(F, h0, x, t)[0][b], rtol=0, atol=1e-14)
        assert (res_u[t - 1:, b] == res_u[t - 1, b]).all()                               # kept its state and residual

    torch.manual_seed(0)
    rho, ok, power_off = analyze.spectral_radius(F, h, x, power_iters=20, krylov=12, tol=1e-6)
    assert torch.allclose(rho, radii, rtol=1e-6) and ok.all()
    assert power_off.all()                                      # the complex pair defeats plain power iteration

    norm_J, norm_ok, sigma_min, sigma_ok = analyze.singular_values(F, h, x, krylov=N, tol=1e-6)
    I = torch.eye(N, dtype=torch.float64)
    assert torch.allclose(norm_J, torch.linalg.matrix_norm(A, ord=2), rtol=1e-8) and norm_ok.all()
    assert torch.allclose(sigma_min, torch.linalg.svdvals(I - A)[:, -1], rtol=1e-6) and sigma_ok.all()

    v = torch.randn(x.shape, dtype=torch.float64)
    ift, ift_ok = analyze.ift_sensitivity(F, h, x, v, krylov=8, restarts=20, tol=1e-10)  # restarts exercised
    dh = torch.linalg.solve(I - A, C @ v.flatten(1)[..., None])[..., 0]
    assert torch.allclose(ift, dh.norm(dim=1) / v.flatten(1).norm(dim=1), rtol=1e-8) and ift_ok.all()
    fd = analyze.fd_sensitivity(F, lambda e: torch.zeros(len(e), *h0.shape[1:], dtype=e.dtype), x, v, 500, eps=1e-3)
    assert torch.allclose(fd, ift, rtol=1e-8)

    readout = lambda h: h                                       # every coordinate is an output
    names, p = analyze.path_independence(F, readout, x, h, 500, 1, 1e-10, 1e-6)
    assert p['same'].all() and (p['cos'] > 1 - 1e-10).all() and not p['trivial'].any()   # contraction: every start lands on h*


def test_analyze_input_independent_rotation_is_path_dependent():
    """F(h, x) = R h with R orthogonal: J_x = 0 so the IFT sensitivity is exactly 0, but the reached state
    still moves with the input through h_0 = x (finite differences see it), and other starts never align."""
    g = torch.Generator().manual_seed(1)
    R = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0]
    F = lambda h, x: (h.flatten(1) @ R.T).view_as(h)
    x = torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    h = analyze.iterate(F, x, x, 50)[0]
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ift, ok = analyze.ift_sensitivity(F, h, x, v, krylov=12)
    assert (ift == 0).all() and ok.all()
    assert torch.allclose(analyze.fd_sensitivity(F, lambda e: e, x, v, 50), torch.ones(4, dtype=torch.float64))
    rho = analyze.spectral_radius(F, h, x, krylov=12, tol=1e-8)[0]
    assert torch.allclose(rho, torch.ones(4, dtype=torch.float64))
    names, p = analyze.path_independence(F, lambda h: h, x, h, 50, 1, 1e-8, 1e-6)
    assert p['trivial'][names.index('zeros')].all()             # R 0 = 0: a start that is already a fixed point
    assert not p['same'][~p['trivial']].any() and p['unsettled'][~p['trivial']].all()   # a rotation never settles


def contractive_model(seed=0, B=3, T=8):
    """Tiny recall-standard + outer-norm model in float64, the state's share of the recall projection scaled down
    so that the loop contracts (a fixed point is reached)."""
    torch.manual_seed(seed)
    model = LoopedTransformer(tiny_config(recall='standard', outer_norm=True)).double().requires_grad_(False)
    model.recall_proj.weight[:, :16] -= torch.eye(16)   # drop the identity init, keep the small random part
    model.recall_proj.weight[:, :16] *= 0.02
    e = model.embed(torch.randint(0, 2, (B, T)))
    h, res, _, _ = analyze.iterate(model.step, model.initial_state(e), e, 200)
    assert res[-1].max() < 1e-10, 'the loop must reach its fixed point for these checks to mean anything'
    return model, e, h


def test_analyze_ift_sensitivity_matches_finite_differences_on_a_real_model():
    model, e, h = contractive_model()
    v = torch.randn_like(e)
    v = v * (e.flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1)).view(-1, 1, 1)     # ||v|| = ||e||
    ift, ok = analyze.ift_sensitivity(model.step, h, e, v, tol=1e-10)
    fd = analyze.fd_sensitivity(model.step, model.initial_state, e, v, 200, eps=1e-7)
    assert ok.all() and (ift > 0).all()
    assert torch.allclose(ift, fd, rtol=1e-5)


def test_analyze_jacobian_estimates_match_the_dense_jacobian_of_a_real_model():
    model, e, h = contractive_model(seed=1, B=2, T=4)
    with sdpa_kernel(SDPBackend.MATH):                          # (B, N, N): tiny, so it can be built here
        dense = torch.stack([torch.func.jacrev(lambda z: model.step(z.view_as(h[b:b + 1]), e[b:b + 1]).flatten())(h[b].flatten())
                             for b in range(len(h))])
    N = dense.size(1)
    rho = analyze.spectral_radius(model.step, h, e, krylov=N, tol=1e-9)[0]
    assert torch.allclose(rho, torch.linalg.eigvals(dense).abs().max(1).values, rtol=1e-6)
    norm_J, _, sigma_min, _ = analyze.singular_values(model.step, h, e, krylov=N)
    assert torch.allclose(norm_J, torch.linalg.matrix_norm(dense, ord=2), rtol=1e-6)
    assert torch.allclose(sigma_min, torch.linalg.svdvals(torch.eye(N, dtype=dense.dtype) - dense)[:, -1], rtol=1e-6)


def dense_jacobian(model, h, e):  # (B, N, N), tiny models only
    with sdpa_kernel(SDPBackend.MATH):
        return torch.stack([torch.func.jacrev(lambda z: model.step(z.view_as(h[b:b + 1]), e[b:b + 1]).flatten())(h[b].flatten())
                            for b in range(len(h))])


def test_analyze_removes_the_unseen_mean_direction_of_a_pre_norm_loop():
    """Pre inner norm, no outer norm, internal recall: every read of the state is a LayerNorm, so a constant added
    at one position passes through unchanged (J 1_pos = 1_pos, an eigenvalue 1 by construction) and the full state
    never settles (its mean drifts by the same amount every iteration). Built so that what the readout can see
    contracts: attention reads each position alone (window 1) and subtracts half its normalized state, ln1's eps is
    1 so that the normalization is not scale invariant near 0, and the MLP adds a constant from the input."""
    torch.manual_seed(0)
    model = LoopedTransformer(tiny_config(recall='internal', outer_norm=False, inner_norm='pre', window=1)).double().requires_grad_(False)
    d, blk = 16, model.block
    blk.ln1.eps = 1.0
    blk.attn.qkv.weight[2 * d:] = torch.eye(d)                     # v = LN1(h)
    blk.attn.proj.weight[:] = -0.5 * torch.eye(d)                  # attention adds -LN1(h) / 2
    blk.mlp.fc.weight[:, :d] = 0                                   # the MLP reads only the input ...
    blk.mlp.fc.weight[:, d:].normal_(0, 1.0)
    blk.mlp.proj.weight.normal_(0, 0.05)                           # ... and adds a small constant b(e)
    e = model.embed(torch.randint(0, 2, (2, 4)))
    h, res, _, _ = analyze.iterate(model.step, model.initial_state(e), e, 300, proj=analyze.mean_free)
    full_res = analyze.bnorm(model.step(h, e) - h) / analyze.bnorm(h)
    assert res[-1].max() < 1e-12 and full_res.min() > 1e-4          # what is seen has settled, the mean has not
    seen = analyze.unobservable(model.step, model.readout, h, e)
    assert seen['removed'] and seen['leak'] < 1e-12 and seen['readout'] < 1e-12 and abs(seen['gain'] - 1) < 1e-12

    dense = dense_jacobian(model, h, e)
    N, T = dense.size(1), h.size(1)
    P = torch.block_diag(*[torch.eye(d, dtype=torch.float64) - 1 / d] * T)
    K = N - T                                                      # range(P)'s dimension: a full Krylov space
    assert torch.allclose(torch.linalg.eigvals(dense).abs().max(1).values, torch.ones(2, dtype=torch.float64))  # rho(J) = 1
    truth = torch.linalg.eigvals(P @ dense @ P).abs().max(1).values
    assert (truth < 0.9).all()                                     # the observable map contracts
    rho, ok, _ = analyze.spectral_radius(model.step, h, e, krylov=K, tol=1e-8, proj=analyze.mean_free)
    assert torch.allclose(rho, truth, rtol=1e-6) and ok.all()
    assert (analyze.spectral_radius(model.step, h, e, krylov=N, tol=1e-8)[0] > 1 - 1e-6).all()   # unprojected: 1
    norm_J, _, sigma_min, _ = analyze.singular_values(model.step, h, e, krylov=K, proj=analyze.mean_free)
    I = torch.eye(N, dtype=torch.float64)
    assert torch.allclose(norm_J, torch.linalg.matrix_norm(P @ dense @ P, ord=2), rtol=1e-6)
    sv = torch.linalg.svdvals(P @ (I - dense) @ P)[:, :K]     # on range(P): drop U's T zero singular values
    assert torch.allclose(sigma_min, sv[:, -1], rtol=1e-6) and (sigma_min > 0.1).all()
    v = torch.randn_like(e)
    ift, ift_ok = analyze.ift_sensitivity(model.step, h, e, v, krylov=K, tol=1e-10, proj=analyze.mean_free)
    fd = analyze.fd_sensitivity(model.step, model.initial_state, e, v, 300, eps=1e-7, proj=analyze.mean_free)
    assert ift_ok.all() and torch.allclose(ift, fd, rtol=1e-5)     # bounded, and what the loop really does

    contractive = contractive_model()                              # standard recall reads the state through W: nothing hidden
    assert not analyze.unobservable(contractive[0].step, contractive[0].readout, contractive[2], contractive[1])['removed']


def test_analyze_finds_a_second_attractor():
    """F(h, x) = tanh(3 h + x / 10) coordinate-wise: near 0 every coordinate has two attracting fixed points, about
    +-0.995, so starts from noise land on other fixed points (settled, with other outputs); zeros is no fixed point."""
    F = lambda h, x: torch.tanh(3 * h + 0.1 * x)
    x = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = analyze.iterate(F, x.abs(), x, 200)[0]                     # every coordinate's positive attractor
    torch.manual_seed(0)
    sign = lambda h: torch.stack((h, -h), -1)                     # two classes per coordinate: its sign
    names, p = analyze.path_independence(F, sign, x, h, 200, 1, 1e-10, 1e-6, draws=3)
    noise = torch.tensor(['noise' in n for n in names])
    assert not p['trivial'].any() and not p['unsettled'].any()
    assert p['other'][noise].all() and p['differ'][noise].all() and (p['cos'][noise] < 0.9).all()
    assert p['same'][~noise].any()                                 # some starts do come back (other inputs' states)
    rho = analyze.spectral_radius(F, h, x, krylov=12, tol=1e-8)[0]
    assert (rho < 1).all()                                         # every fixed point attracts: local diagnostics look fine
    judge = lambda logits: (logits.argmax(-1) == 0).flatten(1).all(1)   # right: every coordinate positive, as h's
    p = analyze.path_independence(F, sign, x, h, 200, 1, 1e-10, 1e-6, draws=3, judge=judge)[1]
    assert (p['right'] == p['same']).all()                         # only a start that comes back gives the right answer


def test_analyze_score_counts_answers_right_kept_and_found_from_other_starts():
    """A counter h <- h + e read as 'right while h < 10': after the rule's 2 iterations every example is right, but
    the fastest one (e = 4) is wrong by the cap (4 iterations), so only two of three keep their answer; the score
    is the mean of held x path."""
    judge = lambda logits: logits[:, 0] < 10
    right, held = analyze.answer_held(lambda h, e: h + e, lambda h: h, judge, torch.zeros(3, 1),
                                      torch.tensor([[1.0], [2.0], [4.0]]), 2, 4)
    assert right.tolist() == [True, True, True] and held.tolist() == [True, True, False]
    score, parts = analyze.stability_score(right, held, torch.tensor([1.0, 0.5, 1.0]))
    assert score == pytest.approx(0.5) and parts == pytest.approx({'right': 1.0, 'held': 2 / 3, 'path': 2.5 / 3})


def test_analyze_score_is_ranked_against_the_default_rule_accuracy():
    """Where a checkpoint halts, what counts is model(idx), not the fixed count of iterations: here the fixed-rule
    accuracies rank the checkpoints one way and the default rule's the other; a diverged one counts as 0."""
    acc = lambda rule, default: {'hard': {'accuracy': {'rule': rule, 'default': default}}}
    records = [dict(score=s, **acc(r, d)) for s, r, d in ((0.2, 0.9, 0.1), (0.5, 0.5, 0.4), (0.9, 0.1, 0.8), (0.0, None, None))]
    assert analyze.score_correlation(records) == pytest.approx(1.0)


def save_tiny_checkpoint(path, poison=False, **kw):
    tc = train.TrainConfig(task='prefix_sums', train_difficulty='8')
    torch.manual_seed(0)
    model = LoopedTransformer(tiny_config(**{**tasks.PrefixSums().model_defaults(8), **kw}))
    if poison:                                                  # a diverged loop: the state turns NaN
        model.recall_proj.weight.data.fill_(math.nan)
    train.save_checkpoint(path, model, train.make_optimizer(model, tc), tc, 0, torch.Generator())


def test_analyze_cli_rejects_bad_checkpoints_in_one_line(tmp_path):
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint')
    save_tiny_checkpoint(tmp_path / 'good.pt')
    ckpt = torch.load(tmp_path / 'good.pt', weights_only=True)
    ckpt['config']['model']['d_model'] = 32                    # weights no longer fit the config
    torch.save(ckpt, tmp_path / 'mismatched.pt')
    for path, words in ((tmp_path / 'missing.pt', 'no checkpoint'), (garbage, 'not a readable checkpoint'),
                        (tmp_path / 'mismatched.pt', 'do not match')):
        r = run_script('analyze.py', str(path))
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_analyze_cli_end_to_end_with_json_and_a_diverged_checkpoint(tmp_path):
    save_tiny_checkpoint(tmp_path / 'good.pt', halt_tol=10.0)          # its default rule: the rule, then one more iteration
    save_tiny_checkpoint(tmp_path / 'nan.pt', poison=True)
    model, task = LoopedTransformer.from_checkpoint(tmp_path / 'good.pt'), tasks.PrefixSums()
    out = tmp_path / 'diag.json'
    r = run_script('analyze.py', str(tmp_path / 'good.pt'), str(tmp_path / 'nan.pt'), '--batch', '4', '--hard', '16', '--power_iters', '3', '--krylov', '6',
                   '--acc_n', '8', '--reach_mult', '2', '--draws', '1', '--json', str(out), '--plot', str(tmp_path / 'figs'),
                   '--reach_tol', '0.05')                       # untrained, the loop settles slowly: residual about 2e-2 at the cap
    assert r.returncode == 0, r.stderr
    def no_nan(s):
        raise ValueError(f'{s} in JSON')
    good, bad = json.loads(out.read_text(), parse_constant=no_nan)['checkpoints']
    for name, diff in (('easy', 8), ('hard', 16)):
        s = good[name]
        assert s['difficulty'] == diff and s['n'] == 4 and s['diverged'] == 0 and s['accuracy']['n'] == 8
        assert s['rule_iters'] <= s['reach_iters'] <= s['cap_iters'] == 2 * s['rule_iters'] and 0 <= s['converged'] <= 1
        for key in ('residual', 'rho', 'norm_J', 'sigma_min', 'sens_ift', 'sens_fd'):
            assert math.isfinite(s[key]['median']) and 0 <= s[key].get('converged', 0) <= 1, key
        assert s['state'] == 'full' and not s['observable']['removed']  # standard recall reads the state through W, not a LayerNorm
        assert s['path']['checked'] > 0 and math.isclose(sum(s['path'][k] for k in ('same', 'other_fixed_point', 'unsettled')), 1)
        assert 0 <= s['accuracy']['rule'] <= 1 and 1 <= s['halting']['mean_iters'] <= s['reach_iters']
        assert ('score' in s) == (name == 'easy') and 0 <= s.get('score', 0) <= 1          # the score: easy inputs only
        split = task.eval_set(diff, 8, 0)
        with torch.no_grad():
            assert s['accuracy']['default'] == task.score(model(split['x']), split)['exact'] and s['accuracy']['default_iters'] == s['rule_iters'] + 1
        assert bad[name]['diverged'] == 4 and bad[name]['rho']['median'] is None and bad[name]['accuracy']['rule'] is None
        assert bad[name]['accuracy']['default'] is None and bad[name]['path']['examples'] == 0 and bad[name]['path']['same'] is None
    rows = [line for line in r.stdout.splitlines() if line.endswith(f"{tmp_path / 'nan.pt'} (16)")]   # side by side, hard
    assert len(rows) == 1 and rows[0].split()[3] == 'diverged' and bad['score'] == 0    # variant, state, conv, residual
    assert 'Spearman' in r.stdout
    assert 'pip install matplotlib' in r.stdout or (tmp_path / 'figs' / 'accuracy.png').exists()


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
