"""looped.py: the model, its variants, attention graphs, the halting rule, checkpoint loading."""

import itertools

import numpy as np
import chess
import pytest
import torch

from looped import LoopedConfig, LoopedTransformer, CheckpointError, RECALLS, INNER_NORMS, local_attention, window_mask
import tasks
import train

from conftest import tiny_config, quick_args


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


def branch_outputs(model, h, e):
    """The attention and MLP branches' outputs during one model.step(h, e), caught by forward hooks."""
    out = {}
    hooks = [getattr(model.block, name).register_forward_hook(lambda m, i, o, name=name: out.update({name: o}))
             for name in ('attn', 'mlp')]
    model.step(h, e)
    for hook in hooks:
        hook.remove()
    return out


@pytest.mark.parametrize('recall', RECALLS)
def test_which_branches_read_the_input(recall):
    """At a fixed state, changing the input changes the attention branch's output with standard recall (through
    W [h ; e]) and internal_both, not with internal (ours: the MLP alone) or none; the MLP's with every recall."""
    torch.manual_seed(0)
    model = LoopedTransformer(tiny_config(recall=recall, causal=False))
    h, e1, e2 = torch.randn(3, 2, 8, 16)
    one, two = branch_outputs(model, h, e1), branch_outputs(model, h, e2)
    assert torch.allclose(one['attn'], two['attn']) == (recall in ('none', 'internal'))
    assert torch.allclose(one['mlp'], two['mlp']) == (recall == 'none')


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
    assert sudoku_model(halt_tol=1e-9, max_iters=0).cfg.cap_iters(81) == 24          # cap default: 8 x n_iters


def test_graph_and_halting_rule_survive_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv('LOOPED_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('LOOPED_SUDOKU_POOL', '4')
    train.main(['--task', 'sudoku', '--out_dir', str(tmp_path), '--max_steps', '1', '--batch_size', '2', '--d_model', '16',
                '--n_head', '2', '--n_iters', '2', '--eval_n', '2', '--eval_difficulties', 'r1-4', '--halt_tol', '0.05',
                '--max_iters', '7'])
    model = LoopedTransformer.from_checkpoint(tmp_path / 'ckpt.pt')
    assert (model.cfg.graph, model.cfg.halt_tol, model.cfg.max_iters) == ('sudoku', 0.05, 7)
    assert model.block.attn.mask(81, 'cpu').sum().item() == 81 * 21


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


@pytest.mark.parametrize('recall', ['standard', 'internal_both'])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, recall):
    train.main(quick_args(tmp_path, '--max_steps', '3', '--recall', recall))
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
