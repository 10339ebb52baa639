"""
Stability diagnostics of the fixed-point iteration, test-time compute curves, and a side-by-side
comparison of checkpoints (one row per recall / normalization variant).

    python analyze.py out/ckpt.pt
    python analyze.py out_std/ckpt.pt out_none/ckpt.pt --json diag.json --plot figs

F(h, e) = model.step(h, e) is one iteration, e = model.embed(x). On --batch easy inputs (the training
difficulty) and --batch hard ones (--hard), the loop runs at least the default rule and then on, each example
until its residual is below --reach_tol or reach_mult x the rule is reached: its reached state h*.

Which map is measured. Where no computation after this state can see the per-position mean direction
U = span{1_pos} (J_h maps U into U and the readout ignores it; checked numerically at h_0 and h*), every
number is taken on the observable map P J_h P, P = mean_free, and the output says 'mean-free'; otherwise on
the full state ('full'). Pre inner norm without outer norm (recall none or internal) is the case in point:
every read of the state is a LayerNorm, so J_h 1_pos = 1_pos exactly, an eigenvalue 1 that no model can
change, and the mean drifts without the outputs ever noticing. Per example (tables show medians):

  residual   ||P(h_{t+1} - h_t)|| / ||P h_t|| per iteration and at the end; converged: below --reach_tol
  rho        spectral radius of J_h at h* (< 1: h* attracts): power iteration, then Arnoldi's largest Ritz
             value from the power vector (power iteration alone misleads on complex dominant pairs)
  norm_J     ||J_h||, the largest singular value (Lanczos on J^T J)
  sigma_min  smallest singular value of I - J_h (Lanczos on (I-J)^T (I-J), an upper bound); near 0 the
             implicit gradient (I - J_h)^{-T} g blows up
  sens_ift   ||dh*|| / ||v||, dh* = (I - J_h)^{-1} J_x v by GMRES (implicit function theorem), J_x = dF/de,
             v a random input direction with ||v|| = ||e||; only a solution where GMRES converged
  sens_fd    the same by a forward difference in float64 (error about eps relative), rerunning the loop from
             e + eps v, h_0 included: recall 'none' has J_x = 0, so sens_ift = 0, yet h* moves through h_0
  path       path independence: from two other inputs' reached states, zeros, and --draws noise starts at
             each --noise scale, where does the loop land? On the examples whose loop converged: the same
             fixed point, another converged one, or nowhere yet; whether the outputs then differ; the minimum
             cosine (Anil et al.'s alignment). On every example: whether the answer is right from that start
             (for the score). A start that is already a fixed point (zeros for a bias-free recall-none loop)
             says nothing and is dropped
  accuracy   task.headline on --acc_n examples: with the checkpoint's default rule (model(idx): the rule's
             iterations, then halting where its config has halt_tol), against fixed iterations (at the rule,
             at the peak, at the cap; overthinking: below the peak by more than --overthink), and with
             --halt_tol halting on the observable residual from the first iteration (on the --batch examples)
  score      the stability score (stability_score), on easy inputs only: the share of examples whose answer
             is right at the rule, stays right at every iteration up to the cap (held), and is also what the
             loop answers from the other starts (path); the state-level numbers above are reported beside it
Every iterative estimate carries converged: the share of examples on which it converged. With several
checkpoints the comparison table ends with Spearman's correlation of score and hard accuracy with the default
rule (score_correlation).
A statistic with a NaN or inf anywhere is null in JSON and 'diverged' in the tables, never a number.

--json FILE writes {config: {flag: value}, checkpoints: [RECORD]}, RECORD = {path, task, step, variant,
recall, inner_norm, outer_norm, score, easy: SPLIT, hard: SPLIT}, SPLIT = {difficulty, n, length,
rule_iters, cap_iters, reach_iters (run), state ('mean-free' | 'full'), observable: {removed, leak,
readout, gain, at_fixed_point}, converged, diverged, residual_curve (median per iteration), seconds (per
diagnostic), residual, rho, norm_J, sigma_min, sens_ift, sens_fd: {median, mean, max, min over examples,
and converged (rho, norm_J, sigma_min, sens_ift), power_off (rho)}, path: {starts, trivial, checked, same,
other_fixed_point, unsettled, outputs_differ (shares of the non-trivial starts; null where no example converged),
min_cos, per_start, examples (converged, checked), right (share of the non-trivial starts of every example
after which the answer is right)},
accuracy: {n, curve: {iters: acc}, rule, default, default_iters (mean), peak, peak_iters, final,
overthinking}, halting: {accuracy, mean_iters, halted}, score, score_parts: {right, held, path} (easy only)}.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields, asdict

import numpy as np
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend

from looped import LoopedTransformer, CheckpointError, load_checkpoint, check_fields, one_line, pick_device, MAX_ITERS
from tasks import get_task
from train import evaluate, evaluate_rule, field_help, OneLineParser


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
    halt_tol: float = 1e-3   # adaptive halting (ours, not the checkpoint's rule): an example stops once its residual is below this
    overthink: float = 0.05  # final accuracy this far below the peak counts as overthinking
    device: str = 'cpu'      # cpu | cuda | cuda:N | mps
    seed: int = 0            # seeds the examples and the random directions
    json: str = ''           # write every number to this file
    plot: str = ''           # write accuracy.png (accuracy and residual against iterations) to this folder (needs matplotlib)

    BOUNDS = dict(max_cost='[1, inf)', batch='[1, 2**16]', acc_n='[1, 2**16]', reach_mult='(0, 1000]', reach_tol='(0, 1)',
                  power_iters='[1, 10000]', krylov='[1, 1000]', tol='(0, 1]', gmres_tol='(0, 1)', eps='(0, 1]',
                  draws='[1, 1000]', same_tol='(0, 1]', halt_tol='[0, inf)', overthink='[0, 1]',
                  seed='[0, 2**63)')   # allowed values (check_fields)

    def validate(self):
        """Raise ValueError with a one-line message for a flag that cannot be meant or a path that cannot be written."""
        check_fields(self)
        pick_device(self.device)
        try:
            scales = [float(s) for s in self.noise.split(',') if s]
        except ValueError:
            scales = []
        if not scales or not all(math.isfinite(x) and x > 0 for x in scales):
            raise ValueError(f"noise must be a comma list of positive numbers, got {self.noise!r}")
        if self.json and not can_write(self.json):
            raise ValueError(f"--json {self.json} cannot be written: it must name a file in an existing, writable folder")
        if self.plot and not can_write(self.plot, folder=True):
            raise ValueError(f"--plot {self.plot} cannot be written: it must name a folder (made if missing) where files can be written")
        return self


def can_write(path, folder=False):
    """Whether path can be written as a file (in an existing folder), or made and filled as a folder."""
    if os.path.exists(path):
        return os.path.isdir(path) == folder and os.access(path, os.W_OK)
    parent = os.path.dirname(os.path.abspath(path))
    return can_write(parent, True) if folder else os.path.isdir(parent) and os.access(parent, os.W_OK)


TINY = 1e-30
UNSEEN_TOL = 1e-4            # a direction is unobservable when J keeps it to itself and the readout ignores it to this

# ----------------------------------------------------------------------------- linear algebra per example
# F acts on every example on its own (attention stays inside a sequence), so J_h is block diagonal over the
# batch: a Krylov vector is a (B, N) batch of per-example vectors and every dot product is per row.

def bnorm(v):  # (B, ...) -> (B,)
    return v.flatten(1).norm(dim=1)


def mean_free(h):
    """P: remove each position's mean over features, the one direction per position that a LayerNorm cannot see."""
    return h - h.mean(-1, keepdim=True)


def arnoldi(A, v0, m):
    """m Arnoldi steps on every row: Q (B, m+1, N) orthonormal, H (B, m+1, m) with A Q[:, :m] = Q H, and the steps
    each row took (B,): fewer where its Krylov space stopped growing (an invariant subspace; later columns are 0)."""
    B, N = v0.shape
    m = min(m, N)
    Q, H = v0.new_zeros(B, m + 1, N), v0.new_zeros(B, m + 1, m)
    Q[:, 0] = v0 / bnorm(v0).clamp_min(TINY)[:, None]
    steps = torch.full((B,), m, dtype=torch.long)
    for j in range(m):
        w, size = A(Q[:, j]), None
        for _ in range(2):                                      # Gram-Schmidt, twice for orthogonality
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
    'min', and whether it converged: its residual ||A y - theta y|| is below tol |theta|."""
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
    """The Jacobian A = df/dx at x as two operators on (B, N) rows, v -> A v and u -> A^T u, from one graph: A^T u
    by backward, and A v by differentiating u -> A^T u, which is linear in u, so exactly (on CPU a few times cheaper
    than forward mode through LayerNorm and attention). A = 0 where f does not read x."""
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):     # fused attention kernels lack double backward
        x = x.detach().requires_grad_()
        y = f(x)
        u = torch.zeros_like(y, requires_grad=True)
        ATu = torch.autograd.grad(y, x, u, create_graph=True, allow_unused=True)[0] if y.requires_grad else None
    if ATu is None:
        return (lambda v: y.new_zeros(len(y), y[0].numel())), (lambda w: x.new_zeros(len(x), x[0].numel()))
    A = lambda v: torch.autograd.grad(ATu, u, v.view_as(x), retain_graph=True)[0].flatten(1)
    return A, lambda w: torch.autograd.grad(y, x, w.view_as(y), retain_graph=True)[0].flatten(1)


def jacobian_ops(F, h, e, proj=None):
    """v -> J_h v and u -> J_h^T u at (h, e), on (B, N) rows. With proj (a symmetric projection P, e.g. mean_free)
    the observable map's Jacobian P J_h P and its transpose."""
    J, JT = linear_ops(lambda h_: F(h_, e), h)
    if not proj:
        return J, JT
    P = lambda v: proj(v.view_as(h)).flatten(1)
    return (lambda v: P(J(P(v)))), (lambda u: P(JT(P(u))))


def start_vector(h, proj=None):  # a random (B, N) Krylov start in the space the operators act on
    v = torch.randn_like(h)
    return (proj(v) if proj else v).flatten(1)


# ----------------------------------------------------------------------------- diagnostics of any step F(h, e)

@torch.no_grad()
def iterate(F, h, e, n_iters, halt_tol=0.0, proj=None, until=0.0, min_iters=0):
    """Up to n_iters iterations h <- F(h, e), residual ||P(h_{t+1} - h_t)|| / ||P h_t|| (P = proj, else the
    identity). With `until`, an example stops once min_iters are done and its residual is below `until` (or not a
    number): it keeps that state and residual while the others go on, and the loop ends when all have stopped.
    Returns the last states, the residuals (iterations run, B), and per example the state at which its residual
    first fell below halt_tol and that iteration (else the last)."""
    P = proj or (lambda v: v)
    res, h_halt, t_halt = [], h, torch.zeros(h.size(0), dtype=torch.long, device=h.device)
    rows = (-1,) + (1,) * (h.dim() - 1)
    active = torch.arange(h.size(0), device=h.device)           # the examples still iterating
    for t in range(n_iters):
        every = len(active) == len(h)
        h_a = h if every else h[active]
        new = F(h_a, e if every else e[active])
        r = res[-1].clone() if res else h.new_zeros(len(h))
        r[active] = bnorm(P(new - h_a)) / bnorm(P(h_a)).clamp_min(TINY)
        h = new if every else h.index_copy(0, active, new)
        res.append(r)
        stop = (r < halt_tol) & (t_halt == 0)
        h_halt = torch.where(stop.view(rows), h, h_halt)
        t_halt[stop] = t + 1
        if until and t + 1 >= min_iters:
            active = active[r[active] >= until]                # NaN compares False: a diverged example stops too
            if not len(active):
                break
    t_halt[t_halt == 0] = len(res)
    return h, torch.stack(res), torch.where((t_halt == len(res)).view(rows), h, h_halt), t_halt


def unobservable(F, readout, h, e):
    """Is the per-position mean direction U = span{1_pos} invisible to everything after this state? It is when
    J_h maps U into U (no later iteration turns it into anything else) and the readout ignores it: then rho,
    ||J||, sigma_min and the IFT solve belong on the observable map P J_h P, P = mean_free. Pre inner norm without
    outer norm (recall none or internal) is the case in point: every read of the state is a LayerNorm, so
    J_h 1_pos = 1_pos exactly, an eigenvalue 1 put there by construction. Measured with a random u in U,
    ||u|| = ||h||: leak ||P J_h u|| / ||u|| (max over examples), readout change max|r(h + u) - r(h)| / max|r(h)|,
    and gain ||J_h u|| / ||u|| (median; 1: U passes through unchanged, 0: an outer norm removes it)."""
    u = torch.randn(h.shape[:-1] + (1,), dtype=h.dtype, device=h.device).expand_as(h)
    u = u * (bnorm(h) / bnorm(u).clamp_min(TINY)).view((-1,) + (1,) * (h.dim() - 1))
    Ju = jacobian_ops(F, h, e)[0](u.flatten(1))
    with torch.no_grad():
        r0, r1 = readout(h), readout(h + u)
    out = dict(leak=(bnorm(mean_free(Ju.view_as(h))) / bnorm(u)).max().item(), gain=(bnorm(Ju) / bnorm(u)).median().item(),
               readout=((r1 - r0).abs().max() / r0.abs().max().clamp_min(TINY)).item())
    out['removed'] = out['leak'] < UNSEEN_TOL and out['readout'] < UNSEEN_TOL   # False for NaN too
    return out


def spectral_radius(F, h, e, power_iters=10, krylov=24, tol=1e-2, proj=None):
    """Per-example spectral radius of J_h (of P J_h P with proj): power iteration, then Arnoldi's largest Ritz
    value from the power vector. Power iteration alone can settle on a wrong value (complex dominant pairs make
    ||J v|| oscillate, near-ties make it creep), so Arnoldi always runs. Returns rho, converged, power_off (power
    iteration's estimate off by more than tol) (B,)."""
    J = jacobian_ops(F, h, e, proj)[0]
    v = start_vector(h, proj)
    for _ in range(power_iters):
        v = v / bnorm(v).clamp_min(TINY)[:, None]
        v = J(v)
    power = bnorm(v)                                            # ||J v|| for the last unit v
    rho, converged = ritz(J, v, krylov, 'abs', tol)
    return rho, converged, (power - rho).abs() > tol * rho


def singular_values(F, h, e, krylov=24, tol=1e-2, proj=None):
    """||J_h|| and sigma_min(I - J_h) per example (on range(P) with proj), by Lanczos on J^T J and on
    (I-J)^T (I-J) (a JVP and a VJP per step). Small singular values converge slowly, but the smallest Ritz value
    never undershoots: sigma_min is an upper bound. Returns norm_J, its converged, sigma_min, its converged (B,)."""
    J, JT = jacobian_ops(F, h, e, proj)
    v0 = start_vector(h, proj)

    def MtM(v):                                                 # (I - J)^T (I - J) v
        u = v - J(v)
        return u - JT(u)
    norm2, norm_ok = ritz(lambda v: JT(J(v)), v0, krylov, 'max', tol, symmetric=True)
    smin2, sigma_ok = ritz(MtM, v0, krylov, 'min', tol, symmetric=True)
    return norm2.clamp_min(0).sqrt(), norm_ok, smin2.clamp_min(0).sqrt(), sigma_ok


def ift_sensitivity(F, h, e, v, krylov=24, tol=1e-4, restarts=4, proj=None):
    """||dh*|| / ||v|| per example for dh* = (I - J_h)^{-1} J_x v (implicit function theorem; with proj,
    (I - P J_h P)^{-1} P J_x v), by restarted GMRES on u -> u - J_h u. Returns the ratio and whether GMRES
    reached tol (B,); where it did not, the ratio is only where GMRES stopped, not the solution."""
    J = jacobian_ops(F, h, e, proj)[0]
    b = linear_ops(lambda e_: F(h, e_), e)[0](v.flatten(1))      # J_x v
    b = proj(b.view_as(h)).flatten(1) if proj else b
    A = lambda u: u - J(u)
    x, r = torch.zeros_like(b), b
    for _ in range(restarts):
        done = bnorm(r) <= tol * bnorm(b)
        if done.all():
            break
        Q, H, steps = arnoldi(A, r, krylov)
        H, y = H.double().cpu().nan_to_num(), torch.zeros(len(b), H.size(2), dtype=torch.float64)
        for i, (k, beta) in enumerate(zip(steps.tolist(), bnorm(r).tolist())):   # min ||beta e_1 - H y|| on the space built
            y[i, :k] = torch.linalg.lstsq(H[i, :k + 1, :k], beta * torch.eye(k + 1, 1, dtype=torch.float64)).solution[:, 0]
        x = x + torch.einsum('bkn,bk->bn', Q[:, :-1], y.to(x)) * ~done[:, None]
        r = b - A(x)
    ratio = torch.where(torch.isfinite(b).all(1), bnorm(x) / bnorm(v), math.nan)
    return ratio, bnorm(r) <= tol * bnorm(b)


def fd_sensitivity(F, init, e, v, n_iters, eps=1e-6, proj=None):
    """||P(h_n(e + eps v) - h_n(e))|| / (eps ||v||), h_n(e) = n_iters iterations from init(e): the reached state's
    dependence on the input along v through every path, the initial state included (one batch of both runs).
    Run it in float64: a forward difference's error is O(eps) from curvature plus O(1e-16 / eps) from rounding,
    about 1e-6 relative at eps 1e-6 (in float32 rounding alone gives a floor near 1e-7 / eps)."""
    B, P = len(e), proj or (lambda x: x)
    e2 = torch.cat((e, e + eps * v))
    h = iterate(F, init(e2), e2, n_iters)[0]
    return bnorm(P(h[B:] - h[:B])) / (eps * bnorm(v))


def path_independence(F, readout, e, h_ref, n_iters, min_iters, tol, same_tol, proj=None, noise=(1.0, 3.0), draws=2,
                      judge=None):
    """Where does the loop land from other starts? Per example: two other inputs' reached states, zeros, and
    `draws` Gaussian starts at each noise scale (x the RMS of the example's own reached state h*). Each runs like
    h* (at least min_iters, at most n_iters, stopping once all residuals are below tol). Returns the start names
    and (K starts, B) tensors: cos (cosine of P h with P h*, Anil et al.'s asymptotic alignment), same (within
    same_tol of h*), other (a different converged fixed point), unsettled (neither), differ (not the same, and its
    readout's argmax differs somewhere), right (judge(logits) of the landing state: the answer is right; False
    without a judge) and trivial: the start is itself already a fixed point (zeros for a bias-free recall-none
    loop, other inputs' fixed points when no iteration reads the input), which says nothing about the input and is
    left out of every summary."""
    P, B = proj or (lambda x: x), len(h_ref)
    rms = (bnorm(h_ref) / math.prod(h_ref.shape[1:]) ** 0.5).view((-1,) + (1,) * (h_ref.dim() - 1))
    starts = {f'other {k}': h_ref.roll(k, 0) for k in range(1, min(3, B))}
    starts['zeros'] = torch.zeros_like(h_ref)
    for s in noise:
        for k in range(draws):
            starts[f'noise x{s:g} #{k + 1}'] = s * rms * torch.randn_like(h_ref)
    K = len(starts)
    h0, ref, E = torch.cat(list(starts.values())), h_ref.repeat(K, *[1] * (h_ref.dim() - 1)), e.repeat(K, *[1] * (e.dim() - 1))
    scale = bnorm(P(ref)).clamp_min(TINY)
    with torch.no_grad():
        trivial = bnorm(P(F(h0, E) - h0)) / scale < tol
    h, res = iterate(F, h0, E, n_iters, proj=proj, until=tol, min_iters=min_iters)[:2]
    same = bnorm(P(h - ref)) / scale < same_tol                 # NaN (diverged) compares False
    settled = res[-1] < tol
    with torch.no_grad():
        logits = readout(h)
        differ = (logits.argmax(-1) != readout(ref).argmax(-1)).flatten(1).any(1) & ~same
        right = torch.cat([judge(lg) for lg in logits.view(K, B, *logits.shape[1:])]) if judge else torch.zeros_like(same)
    cos = (P(h) * P(ref)).flatten(1).sum(1) / (bnorm(P(h)) * scale).clamp_min(TINY)
    out = dict(cos=cos, same=same, other=~same & settled, unsettled=~same & ~settled, differ=differ, right=right.to(same),
               trivial=trivial)
    return list(starts), {k: t.view(K, B) for k, t in out.items()}


def stability_score(right, held, path_right):
    """The stability score of one split: the mean over examples of held x path, where
      right  the answer after the rule's iterations is right (the task's headline, example by example),
      held   it is right after every iteration from the rule to the cap (reach_mult x the rule): the answer is
             reached and kept, whether or not the state itself comes to rest,
      path   the share of the other (non-trivial) starts from which the loop is right at the end: the answer is
             the input's, not the start's (the other inputs' states are among the starts).
    On easy inputs it reads as: on what share of training-difficulty inputs does the loop reach the answer and
    keep it, from any start, i.e. act as a rule that can be iterated longer. It is defined on the answer, not the
    state: loops that extrapolate perfectly can keep moving in directions the readout ignores (README).
    Returns (score, {component: mean over examples}); NaN counts as failure."""
    comp = dict(right=right.double(), held=held.double(), path=path_right.double().nan_to_num(0.0))
    return (comp['held'] * comp['path']).mean().item(), {k: v.mean().item() for k, v in comp.items()}


def spearman(x, y):
    """Spearman's rank correlation (ties get their mean rank); None if either side is constant."""
    def rank(a):
        a = np.asarray(a, dtype=float)
        r = np.empty(len(a))
        r[np.argsort(a, kind='stable')] = np.arange(len(a))
        for v in np.unique(a):
            r[a == v] = r[a == v].mean()
        return r
    rx, ry = rank(x), rank(y)
    return None if rx.std() == 0 or ry.std() == 0 else float(np.corrcoef(rx, ry)[0, 1])


# ----------------------------------------------------------------------------- one checkpoint

def stats(x, **extra):
    """{median, mean, max, min} over examples; None if any is NaN/inf (a diverged example is never averaged away)."""
    x = x.detach().double().cpu()
    ok = bool(torch.isfinite(x).all())
    return dict(median=x.median().item() if ok else None, mean=x.mean().item() if ok else None,
                max=x.max().item() if ok else None, min=x.min().item() if ok else None, **extra)


def frac(mask):
    return mask.float().mean().item()


def pick(split, rows):  # the examples `rows` (a list of indices) of a split, tensors and lists alike
    return {k: v[list(rows)] if torch.is_tensor(v) else [v[i] for i in rows] for k, v in split.items()}


def each_right(task, logits, split):
    """(B,) bool: is each example's answer right (the task's headline score of that example alone)?"""
    return torch.tensor([task.score(logits[i:i + 1], pick(split, [i]))[task.headline] == 1 for i in range(len(logits))])


def answer_held(F, readout, judge, h, e, rule, cap):
    """Per example, from the initial state h: is the answer right after `rule` iterations, and right after every
    iteration from there to `cap`? Returns right, held (B,) bool."""
    with torch.no_grad():
        for t in range(1, cap + 1):
            h = F(h, e)
            if t == rule:
                right = held = judge(readout(h))
            elif t > rule:
                held = held & judge(readout(h))
    return right, held


def analyze_split(model, m64, task, diff, split, cfg, for_score=False):
    x = split['x'][:cfg.batch].to(cfg.device)                  # the diagnostics' examples; accuracy uses all
    rule = model.default_iters(x.size(1))
    cap = max(rule, round(cfg.reach_mult * rule))
    F = model.step
    init = lambda e, m=model: m.initial_state(e, torch.Generator(e.device).manual_seed(cfg.seed))
    out = dict(difficulty=diff, n=len(x), length=x.size(1), rule_iters=rule, cap_iters=cap, seconds={})
    clock = [time.time()]

    def lap(name):
        out['seconds'][name], clock[0] = round(time.time() - clock[0], 2), time.time()
    with torch.no_grad():
        e = model.embed(x)                                      # (B, T, d)
        h0 = init(e)
    unseen = unobservable(F, model.readout, h0, e)              # structural: decided at the start, checked again at h*
    proj = mean_free if unseen['removed'] else None
    h, res, h_halt, t_halt = iterate(F, h0, e, cap, cfg.halt_tol, proj, until=cfg.reach_tol, min_iters=rule)
    finite = torch.isfinite(h.flatten(1)).all(1)
    converged = (res[-1] < cfg.reach_tol) & finite
    at_h = unobservable(F, model.readout, h, e)
    out['observable'] = dict(removed=unseen['removed'], **{k: max(unseen[k], at_h[k]) for k in ('leak', 'readout')},
                             gain=at_h['gain'], at_fixed_point=at_h['removed'])
    out['state'] = 'mean-free' if unseen['removed'] else 'full'
    out.update(reach_iters=len(res), converged=frac(converged), diverged=int((~finite).sum()), residual=stats(res[-1]),
               residual_curve=[r.median().item() if torch.isfinite(r).all() else None for r in res.double().cpu()])
    lap('reach')
    rho, rho_ok, power_off = spectral_radius(F, h, e, cfg.power_iters, cfg.krylov, cfg.tol, proj)
    out['rho'] = stats(rho, converged=frac(rho_ok), power_off=frac(power_off))
    norm_J, norm_ok, sigma_min, sigma_ok = singular_values(F, h, e, cfg.krylov, cfg.tol, proj)
    out['norm_J'] = stats(norm_J, converged=frac(norm_ok))
    out['sigma_min'] = stats(sigma_min, converged=frac(sigma_ok))
    lap('jacobian')
    v = torch.randn_like(e)
    v = v * (bnorm(e) / bnorm(v)).view(-1, 1, 1)                # ||v|| = ||e||: eps is a relative step
    ift, ift_ok = ift_sensitivity(F, h, e, v, cfg.krylov, cfg.gmres_tol, proj=proj)
    fd = fd_sensitivity(m64.step, lambda e_: init(e_, m64), e.double(), v.double(), len(res), cfg.eps, proj).to(ift)
    out['sens_ift'], out['sens_fd'] = stats(ift, converged=frac(ift_ok)), stats(fd)
    lap('sensitivity')
    judge = lambda logits, rows=range(len(x)): each_right(task, logits.float().cpu(), pick(split, rows)).to(x.device)
    who = torch.arange(len(x), device=x.device) if for_score else converged.nonzero()[:, 0]   # the score asks every example
    names, p = path_independence(F, model.readout, e[who], h[who], cap, rule, cfg.reach_tol, cfg.same_tol, proj,
                                 [float(s) for s in cfg.noise.split(',') if s], cfg.draws, lambda lg: judge(lg, who.tolist()))
    keep = ~p['trivial']
    path_right = ((p['right'] & keep).sum(0) / keep.sum(0).clamp_min(1)).where(keep.any(0), torch.ones(len(who), device=x.device))
    keep = keep & converged[who]                                # fixed points: only a converged loop has one to come back to
    share = lambda m: (m & keep).sum().item() / keep.sum().item() if keep.any() else None
    out['path'] = dict(examples=int(converged.sum()), starts=names, checked=int(keep.sum()),
                       trivial=[n for n, t in zip(names, p['trivial'][:, converged[who]]) if len(t) and t.all()],
                       same=share(p['same']), other_fixed_point=share(p['other']), unsettled=share(p['unsettled']),
                       outputs_differ=share(p['differ']), min_cos=p['cos'][keep].min().item() if keep.any() else None,
                       per_start={n: (s & k).sum().item() / max(1, k.sum().item()) for n, s, k in zip(names, p['same'], keep)},
                       right=((p['right'] & ~p['trivial']).sum() / (~p['trivial']).sum().clamp_min(1)).item())
    lap('path')
    counts = sorted({rule, cap} | {int(c) for c in np.geomspace(1, cap, 16).round()})
    first_bad = next((t + 1 for t, r in enumerate(res) if not torch.isfinite(r).all()), math.inf)
    curve = {t: s[task.headline] if t < first_bad else None for t, s in evaluate(model, task, split, counts, 128).items()}
    peak_t = max((t for t in counts if curve[t] is not None), key=curve.get, default=None)
    peak = curve.get(peak_t)
    default, used = curve[rule], torch.tensor([rule])           # the checkpoint's default rule, model(idx): without halt_tol
    if model.cfg.halt_tol > 0:                                  # the fixed rule, else the rule then halting: run it
        scores, used = evaluate_rule(model, task, split)
        default = None if first_bad <= used.max() else scores[task.headline]
    out['accuracy'] = dict(n=len(split['x']), curve=curve, rule=curve[rule], peak=peak, peak_iters=peak_t,
                           final=curve[cap], overthinking=None if curve[cap] is None else curve[cap] < peak - cfg.overthink,
                           default=default, default_iters=used.float().mean().item())
    with torch.no_grad():
        halt_acc = task.score(model.readout(h_halt).float().cpu(), pick(split, range(len(x))))[task.headline]
    out['halting'] = dict(accuracy=None if out['diverged'] else halt_acc, mean_iters=t_halt.float().mean().item(),
                          halted=frac(t_halt < len(res)))
    if for_score:
        right, held = answer_held(F, model.readout, judge, h0, e, rule, cap)
        out['score'], out['score_parts'] = stability_score(right, held, path_right)
    lap('accuracy')
    return out


def prepare(path, cfg):
    """Load a checkpoint, its task and its easy and hard example sets (a one-line error for any failure)."""
    ckpt = load_checkpoint(path)
    tc = ckpt['config'].get('train', {})
    task = get_task(tc.get('task', ''))
    model = LoopedTransformer.from_checkpoint(path).to(cfg.device).requires_grad_(False)
    model64 = LoopedTransformer.from_checkpoint(path).double().to(cfg.device).requires_grad_(False)   # finite differences
    n = max(cfg.batch, cfg.acc_n)
    easy = task.parse_difficulty(tc['train_difficulty']) if tc.get('train_difficulty') else task.train_difficulty
    splits = {'easy': (easy, task.eval_set(easy, n, cfg.seed))}
    cost = lambda split: split['x'].size(1) * model.default_iters(split['x'].size(1))   # per example
    for hard in [task.parse_difficulty(cfg.hard)] if cfg.hard else reversed(task.eval_difficulties):
        splits['hard'] = (hard, task.eval_set(hard, n, cfg.seed))
        if cfg.hard or cost(splits['hard'][1]) <= cfg.max_cost * cost(splits['easy'][1]):
            break
    for name, (diff, split) in splits.items():
        if cfg.reach_mult * model.default_iters(split['x'].size(1)) > MAX_ITERS:
            raise ValueError(f"{path}: reaching the fixed point on {name} inputs ({diff}) would take {cfg.reach_mult:g} x "
                             f"{model.default_iters(split['x'].size(1))} iterations, above {MAX_ITERS}; lower --reach_mult or --hard")
    return dict(path=path, step=ckpt.get('step'), model=model, model64=model64, task=task, splits=splits)


def analyze_checkpoint(c, cfg):
    torch.manual_seed(cfg.seed)                                 # the same random directions for every checkpoint
    m = c['model'].cfg
    r = dict(path=c['path'], task=c['task'].name, step=c['step'], recall=m.recall, inner_norm=m.inner_norm,
             outer_norm=m.outer_norm, variant=f"{m.recall}/{m.inner_norm}/{'outer' if m.outer_norm else 'no-outer'}",
             **{name: analyze_split(c['model'], c['model64'], c['task'], *c['splits'][name], cfg, name == 'easy')
                for name in ('easy', 'hard')})
    r['score'] = r['easy']['score']                             # the stability score: easy inputs only
    return no_nan(r)


def no_nan(x):
    """Every NaN or inf in a record becomes None ('diverged' in the tables, null in JSON), never a number."""
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


def path_cell(s):  # same / other fixed point / unsettled (% of non-trivial starts); '-': no converged example to check
    p = s['path']
    return f"{p['same']:.0%}/{p['other_fixed_point']:.0%}/{p['unsettled']:.0%}" if p['checked'] else '-'


def cos_cell(s):  # the minimum cosine of a checked start with h*
    return fmt(s['path']['min_cos'], '.2f') if s['path']['checked'] else '-'


ROWS = [  # (label, cell of one split): the table of one checkpoint
    ('state measured', lambda s: s['state'] + (f" (J 1={fmt(s['observable']['gain'], '.2f')})" if s['state'] != 'full' else '')),
    ('iterations: rule / ran / cap', lambda s: f"{s['rule_iters']} / {s['reach_iters']} / {s['cap_iters']}"),
    ('converged (diverged)', lambda s: f"{s['converged']:.0%} ({s['diverged']} of {s['n']})"),
    ('residual median (max)', lambda s: fmt(s['residual']['median'], '.1e', f" ({fmt(s['residual']['max'], '.1e')})")),
    ('rho (max) conv', lambda s: fmt(s['rho']['median'], '.3f', f" ({fmt(s['rho']['max'], '.3f')}){ok(s['rho'])}")),
    ('||J_h|| conv', lambda s: fmt(s['norm_J']['median'], '.3f', ok(s['norm_J']))),
    ('sigma_min(I-J) <= conv', lambda s: fmt(s['sigma_min']['median'], '.3f', ok(s['sigma_min']))),
    ('sensitivity IFT conv', lambda s: fmt(s['sens_ift']['median'], '.3g', ok(s['sens_ift']))),
    ('sensitivity FD (float64)', lambda s: fmt(s['sens_fd']['median'], '.3g')),
    ('starts same/other fp/unset', lambda s: f"{path_cell(s)} ({s['path']['examples']} ex)"),
    ('  outputs differ, min cos', lambda s: f"{s['path']['outputs_differ']:.0%}, {cos_cell(s)}" if s['path']['checked'] else '-'),
    ('  trivial starts dropped', lambda s: ','.join(t.split(' #')[0] for t in s['path']['trivial']) or '-'),
    ('accuracy % at rule iterations', lambda s: pct(s['accuracy']['rule'])),
    ('default rule % / iterations', lambda s: pct(s['accuracy']['default'], f" / {s['accuracy']['default_iters']:.1f}")),
    ('peak % @ iterations', lambda s: pct(s['accuracy']['peak'], f" @ {s['accuracy']['peak_iters']}")),
    ('at the cap %', lambda s: pct(s['accuracy']['final'], ' overthinks' if s['accuracy']['overthinking'] else '')),
    ('halting % / mean iterations', lambda s: pct(s['halting']['accuracy'], f" / {s['halting']['mean_iters']:.1f}")),
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
    ('cap %', 8, lambda s: pct(s['accuracy']['final'])), ('halt it', 8, lambda s: f"{s['halting']['mean_iters']:.1f}"),
    ('score', 6, lambda s: f"{s['score']:.2f}" if 'score' in s else '-'),
]

LEGEND = """state: 'mean-free' = measured on the observable map (each position's mean over features, which J maps to itself and
no read of the state sees, projected out), 'full' = the whole state. conv: examples whose residual fell below reach_tol.
'X conv': X's median and the share of examples on which its iterative estimate converged. same/fp/unset: other starts
landing on the same fixed point / on another fixed point / nowhere yet (% of the non-trivial starts of converged
examples; '-': none converged). acc % @ it: accuracy with the checkpoint's default rule, model(idx) (the rule's
iterations, then halting where the checkpoint has halt_tol), and its mean iterations; peak@it: the best fixed count of
iterations; cap %: at reach_mult x the rule. halt it: mean iterations of --halt_tol halting. score: the stability
score, on easy inputs only."""


def print_checkpoint(r):
    print(f"\n{r['path']} | {r['task']} | {r['variant']} | step {r['step']} | medians over examples")
    print(f"{'':30}" + ''.join(f"{name + ' (' + str(r[name]['difficulty']) + ')':>34}" for name in ('easy', 'hard')))
    for label, cell in ROWS:
        print(f"{label:30}{cell(r['easy']):>34}{cell(r['hard']):>34}")
    for name in ('easy', 'hard'):
        print(f"seconds {name}: " + ', '.join(f'{k} {v:.1f}' for k, v in r[name]['seconds'].items()))


def print_comparison(records):
    for name in ('easy', 'hard'):
        print(f"\n{name} inputs (medians over examples)")
        print(f"{'variant':22}" + ''.join(f'{h:>{w + 1}}' for h, w, _ in COLUMNS) + '  checkpoint (difficulty)')
        for r in records:
            print(f"{r['variant']:22}" + ''.join(f'{cell(r[name]):>{w + 1}}' for _, w, cell in COLUMNS) + f"  {r['path']} ({r[name]['difficulty']})")
    print(LEGEND)
    rho = score_correlation(records)
    rho = 'undefined (one side is constant)' if rho is None else f'{rho:.3f}'
    print(f"stability score (easy inputs) against hard accuracy with the default rule: Spearman {rho} over {len(records)} checkpoints")


def score_correlation(records):
    """Spearman's correlation of the stability score with what it should predict: accuracy on hard inputs with each
    checkpoint's own default rule, model(idx), halting included where the checkpoint has it (a diverged loop: 0)."""
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
        label = f"{r['variant']} (score {r['score']:.2f})"
        for split, ax in zip(('easy', 'hard'), axes):
            s = r[split]
            ax.plot(list(s['accuracy']['curve']), [100 * nan(v) for v in s['accuracy']['curve'].values()], color=f'C{i % 10}',
                    ls='-' if i < 10 else '--', marker='.', label=label)
            ax.axvline(s['rule_iters'], color='gray', lw=0.8)
            ax.set(xlabel='iterations (gray: the default rule)', ylabel='accuracy %', title=f"{split} ({s['difficulty']})")
        s = r['easy']
        axes[2].semilogy(range(1, s['reach_iters'] + 1), [nan(v) for v in s['residual_curve']], color=f'C{i % 10}',
                         ls='-' if i < 10 else '--', label=label)
    axes[2].set(xlabel='iterations', ylabel='residual (median)', title=f"easy ({records[0]['easy']['difficulty']}): residual")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'accuracy.png'), dpi=80)
    plt.close(fig)
    print(f"wrote accuracy.png to {out_dir}")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('ckpt', nargs='+', help='checkpoints written by train.py (out_dir/ckpt.pt)')
    helps = field_help(AnalyzeConfig)
    for f in fields(AnalyzeConfig):
        p.add_argument(f'--{f.name}', type=type(f.default), default=f.default, help=f'{helps[f.name]} [{f.default}]')
    args = vars(p.parse_args(argv))
    paths = args.pop('ckpt')
    try:
        return paths, AnalyzeConfig(**args).validate()
    except ValueError as err:
        raise SystemExit(f"analyze.py: error: {err}")


def main(argv=None):
    paths, cfg = parse_args(argv)
    try:
        checkpoints = [prepare(path, cfg) for path in paths]    # every file checked before the long part
        records = []
        for c in checkpoints:
            records.append(analyze_checkpoint(c, cfg))
            print_checkpoint(records[-1])
    except (CheckpointError, ValueError) as err:                # TaskError is a ValueError
        raise SystemExit(f"analyze.py: error: {one_line(err)}")
    if len(records) > 1:
        print_comparison(records)
    try:
        if cfg.json:
            with open(cfg.json, 'w') as f:
                json.dump({'config': asdict(cfg), 'checkpoints': records}, f, indent=1, allow_nan=False)
            print(f"wrote {cfg.json}")
        if cfg.plot:
            plot(records, cfg.plot)
    except OSError as err:
        raise SystemExit(f"analyze.py: error: cannot write {err.filename}: {err.strerror}")


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        print("analyze.py: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130)
