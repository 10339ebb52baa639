"""
Stability diagnostics of the fixed-point iteration, test-time compute curves, and a side-by-side comparison of
checkpoints (one row per recall / normalization variant).

    python analyze.py out/ckpt.pt
    python analyze.py out_std/ckpt.pt out_none/ckpt.pt --json diag.json --plot figs

On --batch easy inputs (the training difficulty) and --batch hard ones (--hard) the loop h <- step(h, e) runs
the default rule, then each example until its residual ||P(h_{t+1} - h_t)|| / ||P h_t|| is below --reach_tol,
at most reach_mult x the rule: its reached state h*. P is mean_free where the per-position mean direction is
unseen by everything after the state ('mean-free'), else the identity ('full').

--json FILE writes {config: {flag: value}, checkpoints: [record]}. A record has path, task, step, variant,
recall, inner_norm, outer_norm, score, and per split (easy, hard):
  difficulty, n, length, rule_iters, cap_iters, reach_iters    inputs; iterations of the rule, the cap, the loop
  state, observable {removed, leak, readout, gain, at_fixed_point}    the state measured ('mean-free' | 'full')
  converged, diverged, residual, residual_curve                shares, count, stats, median per iteration
  rho, norm_J, sigma_min                                       spectral radius, ||J_h||, sigma_min(I - J_h) at h*
  sens_ift, sens_fd                                            ||dh*|| / ||v||: implicit function theorem, float64 FD
  path {starts, trivial, checked, same, other_fixed_point, unsettled, outputs_differ, min_cos, per_start,
        examples, right}                                       where the loop lands from other starts
  accuracy {n, curve {iters: acc}, rule, default, default_iters, peak, peak_iters, final, overthinking}
  halting {accuracy, mean_iters, halted}                       the checkpoint's default rule, model.run
  score, score_parts {right, held, path}                       the stability score (easy only)
  seconds {reach, jacobian, sensitivity, path, accuracy}
Stats are {median, mean, max, min} over examples, with converged (share whose estimate converged) for rho,
norm_J, sigma_min, sens_ift and power_off for rho. NaN or inf is null in JSON and 'diverged' in the tables.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields, asdict

import numpy as np
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend

from looped import LoopedTransformer, CheckpointError, ITER_LIMIT, check_types, check_range, iterate, load_checkpoint
from looped import one_line
from tasks import get_task
from train import evaluate, field_help, OneLineParser, pick_device


@dataclass
class AnalyzeConfig:
    hard: str = ''           # hard difficulty ('' = the hardest eval difficulty within max_cost)
    max_cost: float = 16.0   # default hard: per-example cost (length x default iterations) at most this x easy
    batch: int = 16          # examples per split for the diagnostics
    acc_n: int = 16          # examples per split for the accuracy curves (the diagnostics' examples among them)
    reach_mult: float = 4.0  # iterations to the fixed point: at least the default rule, at most this x the rule
    reach_tol: float = 1e-5  # an example has converged once its residual is below this
    power_iters: int = 10    # power iterations before Arnoldi, for the spectral radius
    krylov: int = 24         # Krylov subspace size (Arnoldi, Lanczos, GMRES)
    tol: float = 1e-2        # an eigen/singular value has converged once its Ritz residual is below tol x value
    gmres_tol: float = 1e-4  # GMRES stops at this relative residual (at most 4 restarts)
    eps: float = 1e-6        # finite-difference step relative to ||e||, taken in float64
    noise: str = '1,3'       # path independence: scales of the noise starts, relative to the state's RMS
    draws: int = 2           # noise starts per scale and example
    same_tol: float = 1e-2   # a start reached the same fixed point when ||P(h - h*)|| / ||P h*|| is below this
    overthink: float = 0.05  # final accuracy this far below the peak counts as overthinking
    device: str = 'cpu'      # cpu | cuda | cuda:N | mps
    seed: int = 0            # seeds the examples and the random directions
    json: str = ''           # write every number to this file
    plot: str = ''           # write accuracy.png (accuracy and residual against iterations) to this folder

    def validate(self):
        """Raise ValueError with a one-line message for a flag that cannot be meant; returns self."""
        check_types(self)
        positive = ('reach_mult', 'reach_tol', 'tol', 'gmres_tol', 'eps', 'same_tol')
        for name, lo, hi in (('max_cost', 1, math.inf), ('batch', 1, 2**16), ('acc_n', 1, 2**16),
                             ('reach_mult', 0, 1000), ('reach_tol', 0, 1), ('power_iters', 1, 10000),
                             ('krylov', 1, 1000), ('tol', 0, 1), ('gmres_tol', 0, 1), ('eps', 0, 1), ('draws', 1, 1000),
                             ('same_tol', 0, 1), ('overthink', 0, 1), ('seed', 0, 2**63)):
            open_hi = name in ('reach_tol', 'gmres_tol', 'seed')
            check_range(self, name, lo, hi, open_lo=name in positive, open_hi=open_hi)
        pick_device(self.device)
        self.scales()
        if self.json and not can_write(self.json):
            raise ValueError(f"--json {self.json} cannot be written: it must name a file in an existing, "
                             f"writable folder")
        if self.plot and not can_write(self.plot, folder=True):
            raise ValueError(f"--plot {self.plot} cannot be written: it must name a folder (made if missing) "
                             f"where files can be written")
        return self

    def scales(self):
        """The noise scales (a list of positive numbers), or a one-line ValueError."""
        try:
            scales = [float(s) for s in self.noise.split(',') if s]
        except ValueError:
            scales = []
        if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
            raise ValueError(f"noise must be a comma list of positive numbers, got {self.noise!r}")
        return scales

    def cap(self, rule):
        """The reach loop's cap for a default rule of `rule` iterations."""
        return max(rule, round(self.reach_mult * rule))


def can_write(path, folder=False):
    """Whether path can be written as a file (in an existing folder), or made and filled as a folder."""
    if os.path.exists(path):
        return os.path.isdir(path) == folder and os.access(path, os.W_OK)
    parent = os.path.dirname(os.path.abspath(path))
    return can_write(parent, True) if folder else os.path.isdir(parent) and os.access(parent, os.W_OK)


TINY = 1e-30
UNSEEN_TOL = 1e-4            # a direction is unseen when J keeps it to itself and the readout ignores it to this

# ----------------------------------------------------------------------------- linear algebra per example
# J_h is block diagonal over the batch: a Krylov vector is a (B, N) batch of per-example vectors.

def bnorm(v):  # (B, ...) -> (B,)
    return v.flatten(1).norm(dim=1)


def mean_free(h):
    """P: h (..., d) less each position's mean over features."""
    return h - h.mean(-1, keepdim=True)


def arnoldi(A, v0, m):
    """m Arnoldi steps on every row of v0 (B, N): Q (B, m+1, N) orthonormal, H (B, m+1, m) with A Q[:, :m] = Q H,
    and the steps each row took (B,), fewer where its Krylov space stopped growing (later columns are 0)."""
    B, N = v0.shape
    m = min(m, N)
    Q, H = v0.new_zeros(B, m + 1, N), v0.new_zeros(B, m + 1, m)
    Q[:, 0] = v0 / bnorm(v0).clamp_min(TINY)[:, None]
    steps = torch.full((B,), m, dtype=torch.long)
    for j in range(m):
        w, size = A(Q[:, j]), None
        for _ in range(2):                                      # Gram-Schmidt, twice
            c = torch.einsum('bkn,bn->bk', Q[:, :j + 1], w)
            size = bnorm(w) if size is None else size
            w = w - torch.einsum('bkn,bk->bn', Q[:, :j + 1], c)
            H[:, :j + 1, j] += c
        stop = (bnorm(w) <= 1e-6 * size) & (steps == m)        # breakdown: w lies in the space already built
        steps[stop.cpu()] = j + 1
        w = w * ~stop[:, None]
        H[:, j + 1, j] = bnorm(w)
        Q[:, j + 1] = w / H[:, j + 1, j].clamp_min(TINY)[:, None]
    return Q, H, steps


def ritz(A, v0, m, which, tol, symmetric=False):
    """The extreme Ritz value (B,) of A on an m-step Krylov space, which = 'abs' (largest modulus), 'max' or
    'min', and whether it converged (B,): its residual ||A y - theta y|| is below tol |theta|."""
    _, H, steps = arnoldi(A, v0, m)
    H = H.double().cpu()
    theta, converged = torch.full((len(H),), math.nan, dtype=torch.float64), torch.zeros(len(H), dtype=torch.bool)
    for b, k in enumerate(steps.tolist()):                      # each row on the space it built
        Hb = H[b, :k, :k]
        if not torch.isfinite(H[b]).all():
            continue
        vals, vecs = torch.linalg.eigh((Hb + Hb.T) / 2) if symmetric else torch.linalg.eig(Hb)
        size = vals.abs() if which == 'abs' else vals.real
        i = int((-size if which == 'min' else size).argmax())
        theta[b] = size[i]
        converged[b] = H[b, k, k - 1] * vecs[-1, i].abs() <= tol * size[i].abs()
    return theta.to(v0.device), converged.to(v0.device)


def linear_ops(f, x):
    """The Jacobian A = df/dx at x as two operators on (B, N) rows, v -> A v and u -> A^T u, from one graph (A v by
    differentiating u -> A^T u). A = 0 where f does not read x."""
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):     # fused attention kernels lack double backward
        x = x.detach().requires_grad_()
        y = f(x)
        u = torch.zeros_like(y, requires_grad=True)
        ATu = torch.autograd.grad(y, x, u, create_graph=True, allow_unused=True)[0] if y.requires_grad else None
    if ATu is None:
        return (lambda v: y.new_zeros(len(y), y[0].numel())), (lambda w: x.new_zeros(len(x), x[0].numel()))
    A = lambda v: torch.autograd.grad(ATu, u, v.view_as(x), retain_graph=True)[0].flatten(1)
    return A, lambda w: torch.autograd.grad(y, x, w.view_as(y), retain_graph=True)[0].flatten(1)


def jacobian_ops(step, h, e, proj=None):
    """v -> J_h v and u -> J_h^T u at (h, e) on (B, N) rows; with proj (a symmetric projection P), P J_h P and
    its transpose."""
    J, JT = linear_ops(lambda h_: step(h_, e), h)
    if not proj:
        return J, JT
    P = lambda v: proj(v.view_as(h)).flatten(1)
    return (lambda v: P(J(P(v)))), (lambda u: P(JT(P(u))))


def start_vector(h, proj=None):  # a random (B, N) Krylov start in the space the operators act on
    v = torch.randn_like(h)
    return (proj(v) if proj else v).flatten(1)


def spectral_radius(step, h, e, power_iters=10, krylov=24, tol=1e-2, proj=None):
    """Spectral radius of J_h (P J_h P with proj) per example: power iteration, then Arnoldi's largest Ritz value
    from the power vector. Returns rho, converged, power_off (power iteration off by more than tol), each (B,)."""
    J = jacobian_ops(step, h, e, proj)[0]
    v = start_vector(h, proj)
    for _ in range(power_iters):
        v = v / bnorm(v).clamp_min(TINY)[:, None]
        v = J(v)
    power = bnorm(v)                                            # ||J v|| for the last unit v
    rho, converged = ritz(J, v, krylov, 'abs', tol)
    return rho, converged, (power - rho).abs() > tol * rho


def singular_values(step, h, e, krylov=24, tol=1e-2, proj=None):
    """||J_h|| and sigma_min(I - J_h) per example (on range(P) with proj), by Lanczos on J^T J and on
    (I-J)^T (I-J); sigma_min is an upper bound. Returns norm_J, its converged, sigma_min, its converged (B,)."""
    J, JT = jacobian_ops(step, h, e, proj)
    v0 = start_vector(h, proj)

    def MtM(v):                                                 # (I - J)^T (I - J) v
        u = v - J(v)
        return u - JT(u)
    norm2, norm_ok = ritz(lambda v: JT(J(v)), v0, krylov, 'max', tol, symmetric=True)
    smin2, sigma_ok = ritz(MtM, v0, krylov, 'min', tol, symmetric=True)
    return norm2.clamp_min(0).sqrt(), norm_ok, smin2.clamp_min(0).sqrt(), sigma_ok


def ift_sensitivity(step, h, e, v, krylov=24, tol=1e-4, restarts=4, proj=None):
    """||dh*|| / ||v|| per example for dh* = (I - J_h)^{-1} J_x v (with proj, (I - P J_h P)^{-1} P J_x v), by
    restarted GMRES. Returns the ratio and whether GMRES reached tol (B,)."""
    J = jacobian_ops(step, h, e, proj)[0]
    b = linear_ops(lambda e_: step(h, e_), e)[0](v.flatten(1))      # J_x v
    b = proj(b.view_as(h)).flatten(1) if proj else b
    A = lambda u: u - J(u)
    x, r = torch.zeros_like(b), b
    for _ in range(restarts):
        done = bnorm(r) <= tol * bnorm(b)
        if done.all():
            break
        Q, H, steps = arnoldi(A, r, krylov)
        H, y = H.double().cpu().nan_to_num(), torch.zeros(len(b), H.size(2), dtype=torch.float64)
        for i, (k, beta) in enumerate(zip(steps.tolist(), bnorm(r).tolist())):   # min ||beta e_1 - H y||
            e1 = beta * torch.eye(k + 1, 1, dtype=torch.float64)
            y[i, :k] = torch.linalg.lstsq(H[i, :k + 1, :k], e1).solution[:, 0]
        x = x + torch.einsum('bkn,bk->bn', Q[:, :-1], y.to(x)) * ~done[:, None]
        r = b - A(x)
    ratio = torch.where(torch.isfinite(b).all(1), bnorm(x) / bnorm(v), math.nan)
    return ratio, bnorm(r) <= tol * bnorm(b)


# ----------------------------------------------------------------------------- diagnostics of any step(h, e)

@torch.no_grad()
def run_loop(step, h, e, n_iters, halt_tol=0.0, min_iters=0, proj=None):
    """looped.iterate to its end: the last state (B, T, d) and residuals (B,) (None after 0 iterations)."""
    residual = None
    for h, residual, _ in iterate(step, h, e, n_iters, halt_tol, min_iters, proj):
        pass
    return h, residual


def unobservable(step, readout, h, e):
    """Is the per-position mean direction U = span{1_pos} unseen at h: J_h maps U into U and the readout ignores
    it? For a random u in U, ||u|| = ||h||: {leak: ||P J_h u|| / ||u|| (max over examples), readout:
    max|r(h + u) - r(h)| / max|r(h)|, gain: ||J_h u|| / ||u|| (median), removed: leak and readout < UNSEEN_TOL}."""
    u = torch.randn(h.shape[:-1] + (1,), dtype=h.dtype, device=h.device).expand_as(h)
    u = u * (bnorm(h) / bnorm(u).clamp_min(TINY)).view((-1,) + (1,) * (h.dim() - 1))
    Ju = jacobian_ops(step, h, e)[0](u.flatten(1))
    with torch.no_grad():
        r0, r1 = readout(h), readout(h + u)
    out = dict(leak=(bnorm(mean_free(Ju.view_as(h))) / bnorm(u)).max().item(),
               gain=(bnorm(Ju) / bnorm(u)).median().item(),
               readout=((r1 - r0).abs().max() / r0.abs().max().clamp_min(TINY)).item())
    out['removed'] = out['leak'] < UNSEEN_TOL and out['readout'] < UNSEEN_TOL   # False for NaN too
    return out


def fd_sensitivity(step, init, e, v, n_iters, eps=1e-6, proj=None):
    """||P(h_n(e + eps v) - h_n(e))|| / (eps ||v||) per example (B,), h_n(e) = n_iters iterations from init(e)."""
    B, P = len(e), proj or (lambda x: x)
    e2 = torch.cat((e, e + eps * v))
    h = run_loop(step, init(e2), e2, n_iters)[0]
    return bnorm(P(h[B:] - h[:B])) / (eps * bnorm(v))


def path_independence(step, readout, e, h_ref, n_iters, min_iters, tol, same_tol, proj=None, noise=(1.0, 3.0),
                      draws=2, judge=None):
    """Where does the loop land from other starts: two other inputs' reached states, zeros, and `draws` Gaussian
    starts per noise scale (x the RMS of h_ref), each run like the reach loop? Returns the start names and
    (K starts, B) tensors: cos (of P h with P h_ref), same (within same_tol of h_ref), other (another converged
    state), unsettled, differ (not the same and another argmax somewhere), right (judge(logits), False without a
    judge), trivial (the start is already a fixed point)."""
    P, B = proj or (lambda x: x), len(h_ref)
    rms = (bnorm(h_ref) / math.prod(h_ref.shape[1:]) ** 0.5).view((-1,) + (1,) * (h_ref.dim() - 1))
    starts = {f'other {k}': h_ref.roll(k, 0) for k in range(1, min(3, B))}
    starts['zeros'] = torch.zeros_like(h_ref)
    for s in noise:
        for k in range(draws):
            starts[f'noise x{s:g} #{k + 1}'] = s * rms * torch.randn_like(h_ref)
    K = len(starts)
    h0, ref = torch.cat(list(starts.values())), h_ref.repeat(K, *[1] * (h_ref.dim() - 1))
    E = e.repeat(K, *[1] * (e.dim() - 1))
    scale = bnorm(P(ref)).clamp_min(TINY)
    with torch.no_grad():
        trivial = bnorm(P(step(h0, E) - h0)) / scale < tol
    h, res = run_loop(step, h0, E, n_iters, tol, min_iters, proj)
    same = bnorm(P(h - ref)) / scale < same_tol                 # NaN (diverged) compares False
    settled = res < tol
    with torch.no_grad():
        logits = readout(h)
        differ = (logits.argmax(-1) != readout(ref).argmax(-1)).flatten(1).any(1) & ~same
        right = torch.zeros_like(same)
        if judge:
            right = torch.cat([judge(lg) for lg in logits.view(K, B, *logits.shape[1:])])
    cos = (P(h) * P(ref)).flatten(1).sum(1) / (bnorm(P(h)) * scale).clamp_min(TINY)
    out = dict(cos=cos, same=same, other=~same & settled, unsettled=~same & ~settled, differ=differ,
               right=right.to(same), trivial=trivial)
    return list(starts), {k: t.view(K, B) for k, t in out.items()}


def spearman(x, y):
    """Spearman's rank correlation (ties get their mean rank); None if either side is constant."""
    def rank(a):                                                # ties: the mean of their ranks
        a = np.asarray(a, dtype=float)
        return (a[:, None] > a).sum(1) + ((a[:, None] == a).sum(1) - 1) / 2
    rx, ry = rank(x), rank(y)
    return None if rx.std() == 0 or ry.std() == 0 else float(np.corrcoef(rx, ry)[0, 1])


# ----------------------------------------------------------------------------- one split: groups of numbers

def stats(x, **extra):
    """{median, mean, max, min} over examples; all None if any is NaN or inf."""
    x = x.detach().double().cpu()
    ok = bool(torch.isfinite(x).all())
    return dict(median=x.median().item() if ok else None, mean=x.mean().item() if ok else None,
                max=x.max().item() if ok else None, min=x.min().item() if ok else None, **extra)


def frac(mask):
    return mask.float().mean().item()


def convergence(step, h0, e, rule, cap, tol, proj=None):
    """The reach loop from h0 (B, T, d): `rule` iterations, then each example until its residual is below tol, at
    most cap. Returns {reach_iters, converged, diverged, residual, residual_curve}, the reached states (B, T, d)
    and which examples converged (B,): residual finite and below tol, state finite. Diverged: the state or its
    residual is not finite (norms in float64)."""
    curve = []
    with torch.no_grad():
        for h, residual, _ in iterate(step, h0, e, cap, tol, rule, proj):
            curve.append(residual.clone())
    curve = torch.stack(curve).cpu()                            # (iterations, B)
    diverged = (~torch.isfinite(bnorm(h.double())) | ~torch.isfinite(residual)).cpu()
    converged = (curve[-1] < tol) & ~diverged
    numbers = dict(reach_iters=len(curve), converged=frac(converged), diverged=int(diverged.sum()),
                   residual=stats(curve[-1]),
                   residual_curve=[r.median().item() if torch.isfinite(r).all() else None for r in curve])
    return numbers, h, converged.to(h.device)


def observed(unseen, at_fixed_point):
    """{observable}: the mean direction's check at h_0 (unseen, which decides P) and again at h*."""
    return dict(observable=dict(removed=unseen['removed'], gain=at_fixed_point['gain'],
                                **{k: max(unseen[k], at_fixed_point[k]) for k in ('leak', 'readout')},
                                at_fixed_point=at_fixed_point['removed']))


def jacobian(step, h, e, args, proj=None):
    """{rho, norm_J, sigma_min} at h (B, T, d)."""
    rho, rho_ok, power_off = spectral_radius(step, h, e, args.power_iters, args.krylov, args.tol, proj)
    norm_J, norm_ok, sigma_min, sigma_ok = singular_values(step, h, e, args.krylov, args.tol, proj)
    return dict(rho=stats(rho, converged=frac(rho_ok), power_off=frac(power_off)),
                norm_J=stats(norm_J, converged=frac(norm_ok)), sigma_min=stats(sigma_min, converged=frac(sigma_ok)))


def sensitivity(step, step64, init64, h, e, n_iters, args, proj=None):
    """{sens_ift, sens_fd} along a random input direction v with ||v|| = ||e||; FD in float64 (step64, init64)."""
    v = torch.randn_like(e)
    v = v * (bnorm(e) / bnorm(v)).view(-1, 1, 1)
    ift, ift_ok = ift_sensitivity(step, h, e, v, args.krylov, args.gmres_tol, proj=proj)
    fd = fd_sensitivity(step64, init64, e.double(), v.double(), n_iters, args.eps, proj)
    return dict(sens_ift=stats(ift, converged=frac(ift_ok)), sens_fd=stats(fd))


def path_numbers(step, readout, e, h, converged, judge, rule, cap, args, proj=None, every=False):
    """{path}: path independence from the reached states h of every example (every) or the converged ones; the
    shares count non-trivial starts of converged examples. Also returns the (K, B') tensors of path_independence."""
    who = torch.arange(len(h), device=h.device) if every else converged.nonzero()[:, 0]
    names, p = path_independence(step, readout, e[who], h[who], cap, rule, args.reach_tol, args.same_tol, proj,
                                 args.scales(), args.draws, lambda logits: judge(logits, who.tolist()))
    nontrivial = ~p['trivial']
    keep = nontrivial & converged[who]
    share = lambda m: (m & keep).sum().item() / keep.sum().item() if keep.any() else None
    trivial = [n for n, t in zip(names, p['trivial'][:, converged[who]]) if len(t) and t.all()]
    return dict(path=dict(
        examples=int(converged[who].sum()), starts=names, checked=int(keep.sum()), trivial=trivial,
        same=share(p['same']), other_fixed_point=share(p['other']), unsettled=share(p['unsettled']),
        outputs_differ=share(p['differ']), min_cos=p['cos'][keep].min().item() if keep.any() else None,
        per_start={n: (s & k).sum().item() / max(1, k.sum().item()) for n, s, k in zip(names, p['same'], keep)},
        right=((p['right'] & nontrivial).sum() / nontrivial.sum().clamp_min(1)).item())), p


def accuracy(model, task, split, rule, cap, first_bad, overthink):
    """{accuracy, halting} on every example of split: the headline after fixed iterations (None from first_bad
    on) and with the model's default rule (model.run)."""
    counts = sorted({rule, cap} | {int(c) for c in np.geomspace(1, cap, 16).round()})
    scores, used = evaluate(model, task, split, [*counts, 'rule'])
    curve = {t: scores[t][task.headline] if t < first_bad else None for t in counts}
    peak_t = max((t for t in counts if curve[t] is not None), key=curve.get, default=None)
    peak = curve.get(peak_t)
    default = scores['rule'][task.headline] if used.max() < first_bad else None
    rule_cap = model.cfg.cap_iters(split['x'].size(1)) if model.cfg.halt_tol > 0 else rule
    return dict(accuracy=dict(n=len(split['x']), curve=curve, rule=curve[rule], peak=peak, peak_iters=peak_t,
                              final=curve[cap], default=default, default_iters=used.float().mean().item(),
                              overthinking=None if curve[cap] is None else curve[cap] < peak - overthink),
                halting=dict(accuracy=default, mean_iters=used.float().mean().item(), halted=frac(used < rule_cap)))


def stability_score(step, readout, judge, h0, e, rule, cap, right_from, trivial):
    """{score, score_parts {right, held, path}}: per example, right: judge(readout) after `rule` iterations from h0;
    held: right after every iteration from rule to cap; path: the share of its non-trivial other starts (right_from,
    trivial: (K, B) bool) whose answer is right (1 without any). score: the mean of held x path."""
    right = held = None
    with torch.no_grad():
        for t, (h, _, _) in enumerate(iterate(step, h0, e, cap), 1):
            if t >= rule:
                ok = judge(readout(h))
                right = ok if right is None else right
                held = ok if held is None else held & ok
    counted = ~trivial
    path = ((right_from & counted).sum(0) / counted.sum(0).clamp_min(1)).where(counted.any(0), 1.0)
    parts = dict(right=right.double(), held=held.double(), path=path.double())
    return dict(score=(parts['held'] * parts['path']).mean().item(),
                score_parts={k: v.mean().item() for k, v in parts.items()})


# ----------------------------------------------------------------------------- one checkpoint

def pick(split, rows):  # the examples `rows` (a list of indices) of a split, tensors and lists alike
    return {k: v[list(rows)] if torch.is_tensor(v) else [v[i] for i in rows] for k, v in split.items()}


def each_right(task, logits, split):
    """(B,) bool: is each example's answer right (the task's headline score of that example alone)?"""
    return torch.tensor([task.score(logits[i:i + 1], pick(split, [i]))[task.headline] == 1 for i in range(len(logits))])


def initial_state(model, e, seed):
    """h_0 (B, T, d) for e (B, T, d); noise starts drawn from seed."""
    return model.initial_state(e, torch.Generator(e.device).manual_seed(seed))


def prepare(path, args):
    """A checkpoint ready to analyze, or a one-line error: {path, step, task, model, model64 (float64), splits
    {easy, hard: (difficulty, split)}, unseen (unobservable at the easy inputs' h_0), proj (mean_free or None)}."""
    ckpt = load_checkpoint(path)
    tc = ckpt['config'].get('train', {})
    task = get_task(tc.get('task', ''))
    model = LoopedTransformer.from_checkpoint(path).to(args.device).requires_grad_(False)
    n = max(args.batch, args.acc_n)
    easy = task.parse_difficulty(tc['train_difficulty']) if tc.get('train_difficulty') else task.train_difficulty
    splits = {'easy': (easy, task.eval_set(easy, n, args.seed))}
    cost = lambda split: split['x'].size(1) * model.default_iters(split['x'].size(1))   # per example
    for hard in [task.parse_difficulty(args.hard)] if args.hard else reversed(task.eval_difficulties):
        splits['hard'] = (hard, task.eval_set(hard, n, args.seed))
        if args.hard or cost(splits['hard'][1]) <= args.max_cost * cost(splits['easy'][1]):
            break
    for name, (difficulty, split) in splits.items():
        rule = model.default_iters(split['x'].size(1))
        if args.cap(rule) > ITER_LIMIT:
            raise ValueError(f"{path}: reaching the fixed point on {name} inputs ({difficulty}) would take "
                             f"{args.reach_mult:g} x {rule} iterations, above {ITER_LIMIT}; "
                             f"lower --reach_mult or --hard")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        e = model.embed(splits['easy'][1]['x'][:args.batch].to(args.device))
    unseen = unobservable(model.step, model.readout, initial_state(model, e, args.seed), e)
    return dict(path=path, step=ckpt.get('step'), task=task, model=model, model64=copy.deepcopy(model).double(),
                splits=splits, unseen=unseen, proj=mean_free if unseen['removed'] else None)


def analyze_split(c, name, args):
    """The record of one split (see the module docstring); the score on easy inputs only."""
    model, task, proj, (difficulty, split) = c['model'], c['task'], c['proj'], c['splits'][name]
    x = split['x'][:args.batch].to(args.device)                # the diagnostics' examples; accuracy uses all
    rule = model.default_iters(x.size(1))
    cap, step = args.cap(rule), model.step
    with torch.no_grad():
        e = model.embed(x)
        h0 = initial_state(model, e, args.seed)
    out = dict(difficulty=difficulty, n=len(x), length=x.size(1), rule_iters=rule, cap_iters=cap,
               state='mean-free' if proj else 'full', seconds={})
    clock = [time.time()]

    def lap(key, numbers):
        out.update(numbers)
        out['seconds'][key], clock[0] = round(time.time() - clock[0], 2), time.time()

    def judge(logits, rows=range(len(x))):
        return each_right(task, logits.float().cpu(), pick(split, rows)).to(x.device)
    reached, h, converged = convergence(step, h0, e, rule, cap, args.reach_tol, proj)
    lap('reach', {**reached, **observed(c['unseen'], unobservable(step, model.readout, h, e))})
    lap('jacobian', jacobian(step, h, e, args, proj))
    init64 = lambda e_: initial_state(c['model64'], e_, args.seed)
    lap('sensitivity', sensitivity(step, c['model64'].step, init64, h, e, reached['reach_iters'], args, proj))
    path, p = path_numbers(step, model.readout, e, h, converged, judge, rule, cap, args, proj, every=name == 'easy')
    lap('path', path)
    first_bad = next((t for t, r in enumerate(reached['residual_curve'], 1) if r is None), math.inf)
    numbers = accuracy(model, task, split, rule, cap, first_bad, args.overthink)
    if name == 'easy':
        numbers.update(stability_score(step, model.readout, judge, h0, e, rule, cap, p['right'], p['trivial']))
    lap('accuracy', numbers)
    return out


def analyze_checkpoint(c, args):
    """One checkpoint's record (see the module docstring), NaN and inf as None."""
    torch.manual_seed(args.seed)                                # the same random directions for every checkpoint
    m = c['model'].cfg
    variant = f"{m.recall}/{m.inner_norm}/{'outer' if m.outer_norm else 'no-outer'}"
    record = dict(path=c['path'], task=c['task'].name, step=c['step'], recall=m.recall, inner_norm=m.inner_norm,
                  outer_norm=m.outer_norm, variant=variant,
                  **{name: analyze_split(c, name, args) for name in ('easy', 'hard')})
    record['score'] = record['easy']['score']
    return no_nan(record)


def no_nan(x):
    """x (nested dicts and lists) with every NaN or inf float as None."""
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [no_nan(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


# ----------------------------------------------------------------------------- reporting

def fmt(v, spec='.3g', then=''):
    """A number (and then a suffix), or 'diverged' for None."""
    return 'diverged' if v is None else format(v, spec) + then


def pct(v, then=''):
    return fmt(None if v is None else 100 * v, '.1f', then)


def ok(d):  # the share of examples on which an iterative estimate converged, as a suffix
    return f" {d['converged']:.0%}"


def path_cell(s):  # same / other fixed point / unsettled (% of checked starts); '-': no converged example
    p = s['path']
    return f"{p['same']:.0%}/{p['other_fixed_point']:.0%}/{p['unsettled']:.0%}" if p['checked'] else '-'


def cos_cell(s):  # the minimum cosine of a checked start with h*
    return fmt(s['path']['min_cos'], '.2f') if s['path']['checked'] else '-'


def rule_cell(s):  # the default rule: accuracy / mean iterations / halted
    a = s['accuracy']
    return pct(a['default'], f" / {a['default_iters']:.1f} / {s['halting']['halted']:.0%}")


ROWS = [  # (label, cell of one split): the table of one checkpoint
    ('state measured', lambda s: s['state'] + (f" (J 1={fmt(s['observable']['gain'], '.2f')})"
                                                if s['state'] != 'full' else '')),
    ('iterations: rule / ran / cap', lambda s: f"{s['rule_iters']} / {s['reach_iters']} / {s['cap_iters']}"),
    ('converged (diverged)', lambda s: f"{s['converged']:.0%} ({s['diverged']} of {s['n']})"),
    ('residual median (max)', lambda s: fmt(s['residual']['median'], '.1e', f" ({fmt(s['residual']['max'], '.1e')})")),
    ('rho (max) conv', lambda s: fmt(s['rho']['median'], '.3f', f" ({fmt(s['rho']['max'], '.3f')}){ok(s['rho'])}")),
    ('||J_h|| conv', lambda s: fmt(s['norm_J']['median'], '.3f', ok(s['norm_J']))),
    ('sigma_min(I-J) <= conv', lambda s: fmt(s['sigma_min']['median'], '.3f', ok(s['sigma_min']))),
    ('sensitivity IFT conv', lambda s: fmt(s['sens_ift']['median'], '.3g', ok(s['sens_ift']))),
    ('sensitivity FD (float64)', lambda s: fmt(s['sens_fd']['median'], '.3g')),
    ('starts same/other fp/unset', lambda s: f"{path_cell(s)} ({s['path']['examples']} ex)"),
    ('  outputs differ, min cos', lambda s: f"{s['path']['outputs_differ']:.0%}, {cos_cell(s)}"
     if s['path']['checked'] else '-'),
    ('  trivial starts dropped', lambda s: ','.join(t.split(' #')[0] for t in s['path']['trivial']) or '-'),
    ('accuracy % at rule iterations', lambda s: pct(s['accuracy']['rule'])),
    ('default rule % / iters / halted', rule_cell),
    ('peak % @ iterations', lambda s: pct(s['accuracy']['peak'], f" @ {s['accuracy']['peak_iters']}")),
    ('at the cap %', lambda s: pct(s['accuracy']['final'], ' overthinks' if s['accuracy']['overthinking'] else '')),
    ('score: right/held/path', lambda s: f"{s['score']:.2f}: " + '/'.join(f"{v:.2f}" for v in s['score_parts'].values())
     if 'score' in s else '-'),
]

COLUMNS = [  # (header, width, cell of one split): the side-by-side table, one row per checkpoint
    ('state', 9, lambda s: s['state']), ('conv', 5, lambda s: f"{s['converged']:.0%}"),
    ('residual', 9, lambda s: fmt(s['residual']['median'], '.1e')),
    ('rho conv', 11, lambda s: fmt(s['rho']['median'], '.3f', ok(s['rho']))),
    ('||J||', 8, lambda s: fmt(s['norm_J']['median'], '.2f')),
    ('sig_min conv', 12, lambda s: fmt(s['sigma_min']['median'], '.3f', ok(s['sigma_min']))),
    ('IFT conv', 12, lambda s: fmt(s['sens_ift']['median'], '.3g', ok(s['sens_ift']))),
    ('FD', 8, lambda s: fmt(s['sens_fd']['median'], '.3g')),
    ('same/fp/unset', 14, path_cell), ('min cos', 8, cos_cell),
    ('acc %', 8, lambda s: pct(s['accuracy']['default'])), ('it', 5, lambda s: f"{s['accuracy']['default_iters']:.0f}"),
    ('peak@it', 11, lambda s: pct(s['accuracy']['peak'], f"@{s['accuracy']['peak_iters']}")),
    ('cap %', 8, lambda s: pct(s['accuracy']['final'])), ('halted', 7, lambda s: f"{s['halting']['halted']:.0%}"),
    ('score', 6, lambda s: f"{s['score']:.2f}" if 'score' in s else '-'),
]

LEGEND = """state: 'mean-free' = measured with each position's mean over features projected out, 'full' = the whole
state. conv: examples whose residual fell below reach_tol. 'X conv': X's median and the share of examples on which
its iterative estimate converged. same/fp/unset: other starts landing on the same fixed point / on another fixed point
/ nowhere yet (% of the non-trivial starts of converged examples; '-': none converged). acc % @ it: accuracy with the
checkpoint's default rule, model(idx) (its iterations, then halting where the checkpoint has halt_tol), and its mean
iterations; peak@it: the best fixed count of iterations; cap %: at reach_mult x the rule. halted: examples the
default rule stopped before its cap. score: the stability score, on easy inputs only."""


def print_checkpoint(r):
    print(f"\n{r['path']} | {r['task']} | {r['variant']} | step {r['step']} | medians over examples")
    print(f"{'':32}" + ''.join(f"{name + ' (' + str(r[name]['difficulty']) + ')':>34}" for name in ('easy', 'hard')))
    for label, cell in ROWS:
        print(f"{label:32}{cell(r['easy']):>34}{cell(r['hard']):>34}")
    for name in ('easy', 'hard'):
        print(f"seconds {name}: " + ', '.join(f'{k} {v:.1f}' for k, v in r[name]['seconds'].items()))


def print_comparison(records):
    for name in ('easy', 'hard'):
        print(f"\n{name} inputs (medians over examples)")
        print(f"{'variant':22}" + ''.join(f'{h:>{w + 1}}' for h, w, _ in COLUMNS) + '  checkpoint (difficulty)')
        for r in records:
            cells = ''.join(f'{cell(r[name]):>{w + 1}}' for _, w, cell in COLUMNS)
            print(f"{r['variant']:22}{cells}  {r['path']} ({r[name]['difficulty']})")
    print(LEGEND)
    rho = score_correlation(records)
    rho = 'undefined (one side is constant)' if rho is None else f'{rho:.3f}'
    print(f"stability score (easy inputs) against hard accuracy with the default rule: Spearman {rho} "
          f"over {len(records)} checkpoints")


def score_correlation(records):
    """Spearman's correlation of the score with hard accuracy under each checkpoint's default rule (None: 0)."""
    return spearman([r['score'] for r in records], [r['hard']['accuracy']['default'] or 0.0 for r in records])


def plot(records, out_dir):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib")
        return
    os.makedirs(out_dir, exist_ok=True)
    nan = lambda v: math.nan if v is None else v
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, r in enumerate(records):
        style = dict(color=f'C{i % 10}', ls='-' if i < 10 else '--', label=f"{r['variant']} (score {r['score']:.2f})")
        for split, ax in zip(('easy', 'hard'), axes):
            s, curve = r[split], r[split]['accuracy']['curve']
            ax.plot(list(curve), [100 * nan(v) for v in curve.values()], marker='.', **style)
            ax.axvline(s['rule_iters'], color='gray', lw=0.8)
            ax.set(xlabel='iterations (gray: the default rule)', ylabel='accuracy %',
                   title=f"{split} ({s['difficulty']})")
        s = r['easy']
        axes[2].semilogy(range(1, s['reach_iters'] + 1), [nan(v) for v in s['residual_curve']], **style)
    axes[2].set(xlabel='iterations', ylabel='residual (median)',
                title=f"easy ({records[0]['easy']['difficulty']}): residual")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'accuracy.png'), dpi=80)
    plt.close(fig)
    print(f"wrote accuracy.png to {out_dir}")


def parse_args(argv=None):
    """The checkpoint paths and the checked AnalyzeConfig, or a one-line error."""
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('ckpt', nargs='+', help='checkpoints written by train.py (out_dir/ckpt.pt)')
    helps = field_help(AnalyzeConfig)
    for f in fields(AnalyzeConfig):
        p.add_argument(f'--{f.name}', type=type(f.default), default=f.default, help=f'{helps[f.name]} [{f.default}]')
    flags = vars(p.parse_args(argv))
    paths = flags.pop('ckpt')
    try:
        return paths, AnalyzeConfig(**flags).validate()
    except ValueError as err:
        raise SystemExit(f"analyze.py: error: {err}")


def main(argv=None):
    paths, args = parse_args(argv)
    try:
        checkpoints = [prepare(path, args) for path in paths]   # every file checked before the long part
        records = []
        for c in checkpoints:
            records.append(analyze_checkpoint(c, args))
            print_checkpoint(records[-1])
    except (CheckpointError, ValueError) as err:                # TaskError is a ValueError
        raise SystemExit(f"analyze.py: error: {one_line(err)}")
    if len(records) > 1:
        print_comparison(records)
    try:
        if args.json:
            with open(args.json, 'w') as f:
                json.dump({'config': asdict(args), 'checkpoints': records}, f, indent=1, allow_nan=False)
            print(f"wrote {args.json}")
        if args.plot:
            plot(records, args.plot)
    except OSError as err:
        raise SystemExit(f"analyze.py: error: cannot write {err.filename}: {err.strerror}")


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        print("analyze.py: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130)
