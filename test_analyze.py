"""analyze.py and bench.py: diagnostics against exact linear algebra, the score, the command lines."""

import json
import math

import pytest
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend

from looped import LoopedTransformer, iterate
import analyze
import tasks

from conftest import run_script, tiny_config, save_tiny_checkpoint


def linear_toy(B=3, N=24, P=12, seed=0):
    """step(h, x) = A_b h + C_b x per example b (float64), with A_b = S D S^{-1} non-normal: a dominant
    complex pair r_b e^{+-i theta_b}, every other eigenvalue inside |z| <= 0.5. Shapes h (B, 4, N/4), x (B, 4, P/4).
    analyze stacks, perturbs and subsets rows, so step finds each row's b from its input."""
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
    step = lambda h, x_: (A[which(x_)] @ h.flatten(1)[..., None]
                          + C[which(x_)] @ x_.flatten(1)[..., None]).view_as(h)
    return step, A, C, x, torch.tensor(radii, dtype=torch.float64)


def test_analyze_linear_toy_matches_exact_linear_algebra():
    step, A, C, x, radii = linear_toy()
    B, N = A.shape[:2]
    h0 = torch.zeros(B, 4, N // 4, dtype=torch.float64)
    reached, h, converged = analyze.convergence(step, h0, x, 5, 500, 1e-12)
    h_exact = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - A, C @ x.flatten(1)[..., None])[..., 0]
    assert torch.allclose(h.flatten(1), h_exact, atol=1e-10) and reached['residual']['max'] < 1e-12
    assert converged.all() and reached['converged'] == 1 and reached['diverged'] == 0
    assert torch.allclose(torch.linalg.eigvals(A).abs().max(1).values, radii)        # the toy is what it claims
    curve = []                                                  # the reach loop: each example stops on its own
    for h_u, residual, used in iterate(step, h0, x, 500, halt_tol=1e-8, min_iters=5):
        curve.append(residual.clone())
    curve, stops = torch.stack(curve), used.tolist()
    assert len(set(stops)) == B and max(stops) == len(curve)                            # the toy's radii differ
    for b, t in enumerate(stops):
        assert curve[t - 1, b] < 1e-8 <= curve[4:t - 1, b].min()
        assert torch.allclose(h_u[b], analyze.run_loop(step, h0, x, t)[0][b], rtol=0, atol=1e-14)
        assert (curve[t - 1:, b] == curve[t - 1, b]).all()                              # kept its state and residual

    torch.manual_seed(0)
    rho, ok, power_off = analyze.spectral_radius(step, h, x, power_iters=20, krylov=12, tol=1e-6)
    assert torch.allclose(rho, radii, rtol=1e-6) and ok.all()
    assert power_off.all()                                      # the complex pair defeats plain power iteration

    norm_J, norm_ok, sigma_min, sigma_ok = analyze.singular_values(step, h, x, krylov=N, tol=1e-6)
    I = torch.eye(N, dtype=torch.float64)
    assert torch.allclose(norm_J, torch.linalg.matrix_norm(A, ord=2), rtol=1e-8) and norm_ok.all()
    assert torch.allclose(sigma_min, torch.linalg.svdvals(I - A)[:, -1], rtol=1e-6) and sigma_ok.all()

    v = torch.randn(x.shape, dtype=torch.float64)
    ift, ift_ok = analyze.ift_sensitivity(step, h, x, v, krylov=8, restarts=20, tol=1e-10)  # restarts exercised
    dh = torch.linalg.solve(I - A, C @ v.flatten(1)[..., None])[..., 0]
    assert torch.allclose(ift, dh.norm(dim=1) / v.flatten(1).norm(dim=1), rtol=1e-8) and ift_ok.all()
    fd = analyze.fd_sensitivity(step, lambda e: torch.zeros(len(e), *h0.shape[1:], dtype=e.dtype), x, v, 500, eps=1e-3)
    assert torch.allclose(fd, ift, rtol=1e-8)

    readout = lambda h: h                                       # every coordinate is an output
    names, p = analyze.path_independence(step, readout, x, h, 500, 1, 1e-10, 1e-6)
    assert p['same'].all() and (p['cos'] > 1 - 1e-10).all() and not p['trivial'].any()   # contraction: every start lands on h*


def test_analyze_input_independent_rotation_is_path_dependent():
    """step(h, x) = R h with R orthogonal: J_x = 0 so the IFT sensitivity is exactly 0, but the reached state
    still moves with the input through h_0 = x (finite differences see it), and other starts never align."""
    g = torch.Generator().manual_seed(1)
    R = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0]
    step = lambda h, x: (h.flatten(1) @ R.T).view_as(h)
    x = torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    h = analyze.run_loop(step, x, x, 50)[0]
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ift, ok = analyze.ift_sensitivity(step, h, x, v, krylov=12)
    assert (ift == 0).all() and ok.all()
    assert torch.allclose(analyze.fd_sensitivity(step, lambda e: e, x, v, 50), torch.ones(4, dtype=torch.float64))
    rho = analyze.spectral_radius(step, h, x, krylov=12, tol=1e-8)[0]
    assert torch.allclose(rho, torch.ones(4, dtype=torch.float64))
    names, p = analyze.path_independence(step, lambda h: h, x, h, 50, 1, 1e-8, 1e-6)
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
    h, res = analyze.run_loop(model.step, model.initial_state(e), e, 200)
    assert res.max() < 1e-10, 'the loop must reach its fixed point for these checks to mean anything'
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
    h, res = analyze.run_loop(model.step, model.initial_state(e), e, 300, proj=analyze.mean_free)
    full_res = analyze.bnorm(model.step(h, e) - h) / analyze.bnorm(h)
    assert res.max() < 1e-12 and full_res.min() > 1e-4          # what is seen has settled, the mean has not
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
    """step(h, x) = tanh(3 h + x / 10) coordinate-wise: near 0 every coordinate has two attracting fixed points, about
    +-0.995, so starts from noise land on other fixed points (settled, with other outputs); zeros is no fixed point."""
    step = lambda h, x: torch.tanh(3 * h + 0.1 * x)
    x = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = analyze.run_loop(step, x.abs(), x, 200)[0]                     # every coordinate's positive attractor
    torch.manual_seed(0)
    sign = lambda h: torch.stack((h, -h), -1)                     # two classes per coordinate: its sign
    names, p = analyze.path_independence(step, sign, x, h, 200, 1, 1e-10, 1e-6, draws=3)
    noise = torch.tensor(['noise' in n for n in names])
    assert not p['trivial'].any() and not p['unsettled'].any()
    assert p['other'][noise].all() and p['differ'][noise].all() and (p['cos'][noise] < 0.9).all()
    assert p['same'][~noise].any()                                 # some starts do come back (other inputs' states)
    rho = analyze.spectral_radius(step, h, x, krylov=12, tol=1e-8)[0]
    assert (rho < 1).all()                                         # every fixed point attracts: local diagnostics look fine
    judge = lambda logits: (logits.argmax(-1) == 0).flatten(1).all(1)   # right: every coordinate positive, as h's
    p = analyze.path_independence(step, sign, x, h, 200, 1, 1e-10, 1e-6, draws=3, judge=judge)[1]
    assert (p['right'] == p['same']).all()                         # only a start that comes back gives the right answer


def test_analyze_score_counts_answers_right_kept_and_found_from_other_starts():
    """A counter h <- h + e read as 'right while h < 10': after the rule's 2 iterations every example is right, but
    the fastest one (e = 4) is wrong by the cap (4 iterations), so only two of three keep their answer. From other
    starts the second example is right from one of its two counted starts (a trivial start is not counted), so
    path = (1, 1/2, 1); the score is the mean of held x path."""
    judge = lambda logits: logits[:, 0] < 10
    right_from = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])   # (K starts, B)
    trivial = torch.tensor([[False] * 3, [False] * 3, [True] * 3])
    out = analyze.stability_score(lambda h, e: h + e, lambda h: h, judge, torch.zeros(3, 1),
                                  torch.tensor([[1.0], [2.0], [4.0]]), 2, 4, right_from, trivial)
    assert out['score'] == pytest.approx(0.5)
    assert out['score_parts'] == pytest.approx({'right': 1.0, 'held': 2 / 3, 'path': 2.5 / 3})
    every_start_trivial = analyze.stability_score(lambda h, e: h + e, lambda h: h, judge, torch.zeros(3, 1),
                                                  torch.tensor([[1.0], [2.0], [4.0]]), 2, 4, right_from, trivial[2:])
    assert every_start_trivial['score_parts']['path'] == 1.0 and every_start_trivial['score'] == pytest.approx(2 / 3)


def test_analyze_never_counts_a_growing_state_as_converged():
    """h <- 1.4 Q h with Q a random rotation by small angles, float32: the state grows 1.4x per iteration. Its
    float32 norm overflows (> 3.4e38) from about iteration 124 while every element stays finite until about 260;
    there a float32 relative residual ||h_{t+1} - h_t|| / ||h_t|| is finite / inf = 0. The reach loop must count
    no example as converged at any cap, and every example as diverged once its state overflows."""
    g = torch.Generator().manual_seed(0)
    S = torch.randn(64, 64, generator=g)
    A = 1.4 * torch.linalg.matrix_exp(0.05 * (S - S.T))       # spectral radius 1.4
    assert torch.allclose(torch.linalg.eigvals(A).abs(), torch.tensor(1.4))
    step = lambda h, e: h @ A.T
    h0 = torch.randn(4, 8, 64, generator=g)
    window = 0
    for cap in (110, 124, 125, 126, 160, 200, 240, 300):
        reached, h, converged = analyze.convergence(step, h0, h0, 1, cap, 1e-5)
        assert reached['converged'] == 0 and not converged.any(), cap
        if torch.isfinite(h).all() and not torch.isfinite(h.flatten(1).norm(dim=1)).any():
            window += 1                                         # the float32 norm overflowed, the elements did not
            assert reached['diverged'] == 0
    assert window >= 4
    assert not torch.isfinite(h).flatten(1).all(1).any() and reached['diverged'] == 4


def test_analyze_score_is_ranked_against_the_default_rule_accuracy():
    """Where a checkpoint halts, what counts is model(idx), not the fixed count of iterations: here the fixed-rule
    accuracies rank the checkpoints one way and the default rule's the other; a diverged one counts as 0."""
    acc = lambda rule, default: {'hard': {'accuracy': {'rule': rule, 'default': default}}}
    records = [dict(score=s, **acc(r, d)) for s, r, d in ((0.2, 0.9, 0.1), (0.5, 0.5, 0.4), (0.9, 0.1, 0.8), (0.0, None, None))]
    assert analyze.score_correlation(records) == pytest.approx(1.0)


def test_analyze_cli_rejects_bad_checkpoints_in_one_line(tmp_path):
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint')
    save_tiny_checkpoint(tmp_path / 'good.pt')
    ckpt = torch.load(tmp_path / 'good.pt', weights_only=True)
    ckpt['config']['model']['d_model'] = 32                    # weights no longer fit the config
    torch.save(ckpt, tmp_path / 'mismatched.pt')
    for path, words in ((tmp_path / 'missing.pt', 'no checkpoint'), (garbage, 'not a readable checkpoint'),
                        (tmp_path / 'mismatched.pt', 'do not match'), (tmp_path, 'is a directory')):
        r = run_script('analyze.py', str(path))
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(SystemExit) as err:                      # the rule at length 65536: 163840 iterations
        analyze.main([str(tmp_path / 'good.pt'), '--hard', '65536'])
    assert str(err.value).startswith('analyze.py: error: ') and 'above 100000' in str(err.value)


def test_analyze_cli_end_to_end_with_json_and_a_diverged_checkpoint(tmp_path):
    save_tiny_checkpoint(tmp_path / 'good.pt', halt_tol=10.0)   # its default rule stops right after the rule
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
        assert 0 <= s['accuracy']['rule'] <= 1 and s['halting']['halted'] == 1 and bad[name]['halting']['halted'] == 0
        assert ('score' in s) == (name == 'easy') and 0 <= s.get('score', 0) <= 1          # the score: easy inputs only
        split = task.eval_set(diff, 8, 0)
        with torch.no_grad():
            assert s['accuracy']['default'] == s['halting']['accuracy'] == task.score(model(split['x']), split)['exact']
        assert s['accuracy']['default_iters'] == s['halting']['mean_iters'] == s['rule_iters']
        assert bad[name]['diverged'] == 4 and bad[name]['rho']['median'] is None and bad[name]['accuracy']['rule'] is None
        assert bad[name]['accuracy']['default'] is None and bad[name]['path']['examples'] == 0 and bad[name]['path']['same'] is None
    rows = [line for line in r.stdout.splitlines() if line.endswith(f"{tmp_path / 'nan.pt'} (16)")]   # side by side, hard
    assert len(rows) == 1 and rows[0].split()[3] == 'diverged' and bad['score'] == 0    # variant, state, conv, residual
    assert 'Spearman' in r.stdout
    assert 'pip install matplotlib' in r.stdout or (tmp_path / 'figs' / 'accuracy.png').exists()


@pytest.mark.parametrize('script,args', [
    ('analyze', ['ckpt.pt', '--eps', '0']), ('analyze', ['ckpt.pt', '--noise', '1,x']),
    ('analyze', ['ckpt.pt', '--max_cost', '-1']),
    ('analyze', ['ckpt.pt', '--device', 'foo']), ('analyze', ['ckpt.pt', '--json', '/no/such/folder/d.json']),
    ('bench', ['step', '--rounds', '0']), ('bench', ['step', '--device', 'foo']), ('bench', ['step', '--configs', 'readme,nope']),
])
def test_analyze_and_bench_flags_are_checked_up_front(script, args):
    module = analyze if script == 'analyze' else __import__('bench')
    with pytest.raises(SystemExit) as err:
        module.parse_args(args)
    assert str(err.value).startswith(f'{script}.py: error: ') and '\n' not in str(err.value)
