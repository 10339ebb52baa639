"""pytest suite: CPU only, a few minutes. Run with `python -m pytest -q`."""

import itertools
import os
import subprocess
import sys

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


# ------------------------------------------------------------------------------------------ analyze

import json
import math

from torch.nn.attention import sdpa_kernel, SDPBackend

import analyze


def linear_toy(B=3, N=24, P=12, seed=0):
    """F(h, x) = A_b h + C_b x per example b (float64), with A_b = S D S^{-1} non-normal: a dominant
    complex pair r_b e^{+-i theta_b}, every other eigenvalue inside |z| <= 0.5. Shapes h (B, 4, N/4), x (B, 4, P/4)."""
    g = torch.Generator().manual_seed(seed)
    radii, A = [0.9, 0.8, 0.85][:B], []
    for r, theta in zip(radii, (0.7, 2.0, 1.2)):
        D = torch.diag(torch.rand(N, generator=g, dtype=torch.float64) - 0.5)
        D[:2, :2] = r * torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
        S = torch.eye(N, dtype=torch.float64) + 0.3 * torch.randn(N, N, generator=g, dtype=torch.float64) / N ** 0.5
        A.append(S @ D @ torch.linalg.inv(S))
    A, C = torch.stack(A), torch.randn(B, N, P, generator=g, dtype=torch.float64) / P ** 0.5
    F = lambda h, x: (A @ h.flatten(1)[..., None] + C @ x.flatten(1)[..., None]).view_as(h)
    x = torch.randn(B, 4, P // 4, generator=g, dtype=torch.float64)
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
    fd = analyze.fd_sensitivity(F, lambda e: torch.zeros_like(h0), x, h, v, 500, eps=1e-3)
    assert torch.allclose(fd, ift, rtol=1e-8)

    for cos in analyze.alignment(F, x, h, 500).values():        # contraction: every start lands on h*
        assert (cos > 1 - 1e-10).all()


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
    assert torch.allclose(analyze.fd_sensitivity(F, lambda e: e, x, h, v, 50), torch.ones(4, dtype=torch.float64))
    rho = analyze.spectral_radius(F, h, x, krylov=12, tol=1e-8)[0]
    assert torch.allclose(rho, torch.ones(4, dtype=torch.float64))
    cos = analyze.alignment(F, x, h, 50)
    assert (cos['zeros'] == 0).all() and torch.stack(list(cos.values())).mean() < 0.5


def contractive_model(seed=0, B=3, T=8):
    """Tiny recall-standard + outer-norm model in float64, the state's share of the recall projection scaled down
    so that the loop contracts (a fixed point is reached)."""
    torch.manual_seed(seed)
    model = LoopedTransformer(tiny_config(recall='standard', outer_norm=True)).double().requires_grad_(False)
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
    fd = analyze.fd_sensitivity(model.step, model.initial_state, e, h, v, 200, eps=1e-7)
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


def save_tiny_checkpoint(path, poison=False):
    tc = train.TrainConfig(task='prefix_sums', train_difficulty='8')
    torch.manual_seed(0)
    model = LoopedTransformer(tiny_config(**tasks.PrefixSums().model_defaults(8)))
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
    save_tiny_checkpoint(tmp_path / 'good.pt')
    save_tiny_checkpoint(tmp_path / 'nan.pt', poison=True)
    out = tmp_path / 'diag.json'
    r = run_script('analyze.py', str(tmp_path / 'good.pt'), str(tmp_path / 'nan.pt'), '--batch', '4', '--hard', '16', '--power_iters', '3', '--krylov', '6',
                   '--json', str(out), '--plot', str(tmp_path / 'figs'))
    assert r.returncode == 0, r.stderr
    def no_nan(s):
        raise ValueError(f'{s} in JSON')
    good, bad = json.loads(out.read_text(), parse_constant=no_nan)['checkpoints']
    for name, diff in (('easy', 8), ('hard', 16)):
        s = good[name]
        assert s['difficulty'] == diff and s['n'] == 4 and s['diverged'] == 0 and s['reach_iters'] == 2 * s['rule_iters']
        for key in ('residual', 'rho', 'norm_J', 'sigma_min', 'sens_ift', 'sens_fd', 'align'):
            assert math.isfinite(s[key]['median']), key
        assert 0 <= s['accuracy']['rule'] <= 1 and 1 <= s['halting']['mean_iters'] <= s['reach_iters']
        assert bad[name]['diverged'] == 4 and bad[name]['rho']['median'] is None and bad[name]['accuracy']['rule'] is None
    rows = [line for line in r.stdout.splitlines() if line.endswith(f"{tmp_path / 'nan.pt'} (16)")]   # side by side, hard
    assert len(rows) == 1 and rows[0].split()[1] == 'diverged'
    assert 'pip install matplotlib' in r.stdout or (tmp_path / 'figs' / 'residual.png').exists()
