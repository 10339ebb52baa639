"""
Stability diagnostics of the fixed-point iteration, test-time compute curves, and a side-by-side
comparison of checkpoints (one row per recall / normalization variant).

    python analyze.py out/ckpt.pt
    python analyze.py out_std/ckpt.pt out_none/ckpt.pt --json diag.json --plot figs

F(h, e) = model.step(h, e) is one iteration, e = model.embed(x). On --batch easy inputs (the training
difficulty) and --batch hard ones (--hard), the loop runs reach_mult x the default iteration count to a
reached state h*. Then, per example (the tables show medians over examples):

  residual   ||h_{t+1} - h_t|| / ||h_t|| per iteration, and at the end (small: h* is a fixed point)
  rho        spectral radius of J_h = dF/dh at h* (< 1: h* attracts): power iteration, then Arnoldi's
             largest Ritz value from the power vector (power iteration alone misleads on complex dominant
             pairs, where ||J v|| oscillates, and on near-ties, where it creeps)
  norm_J     ||J_h||, the largest singular value (Lanczos on J^T J)
  sigma_min  smallest singular value of I - J_h (Lanczos on (I-J)^T (I-J), so an upper bound); near 0
             the implicit gradient (I - J_h)^{-T} g blows up
  sens_ift   ||dh*|| / ||v|| with dh* = (I - J_h)^{-1} J_x v by GMRES (implicit function theorem),
             J_x = dF/de, v a random input direction scaled to ||v|| = ||e||
  sens_fd    the same by a forward difference, rerunning the loop from e + eps v, h_0 included. Recall
             'none' has J_x = 0, so sens_ift = 0, yet h* can still move with the input through h_0
  align      asymptotic alignment (Anil et al. 2022): cosine between h* and where the loop lands from
             another example's h*, Gaussian noise and zeros; 1 = path independent
  accuracy   task.headline against iterations (train.evaluate): at the default rule, at its peak, at the
             end (overthinking: the end below the peak by more than --overthink), and with adaptive
             halting (an example stops once its residual is below --halt_tol; at most reach iterations)
A statistic with a NaN or inf anywhere is null in JSON and 'diverged' in the tables, never a number.

--json FILE writes {config: {flag: value}, checkpoints: [RECORD]}, RECORD = {path, task, step, variant,
recall, inner_norm, outer_norm, easy: SPLIT, hard: SPLIT}, SPLIT = {difficulty, n, length, rule_iters,
reach_iters, diverged (examples whose h* is not finite), residual_curve (median per iteration), seconds
(per diagnostic), accuracy: {curve: {iters: acc}, rule, peak, peak_iters, final, overthinking},
halting: {accuracy, mean_iters, halted (fraction stopped before reach_iters)}, and residual, rho, norm_J,
sigma_min, sens_ift, sens_fd, align: {median, mean, max over examples, and: converged (rho, norm_J,
sigma_min, sens_ift: fraction of examples), power_off (rho: fraction where power iteration alone was off
by more than --tol), other, noise, zeros (align: mean cosine from each start)}}.
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
from torch.func import jvp, vjp
from torch.nn.attention import sdpa_kernel, SDPBackend

from looped import LoopedTransformer, CheckpointError, load_checkpoint, check_fields, one_line, pick_device, MAX_ITERS
from tasks import get_task
from train import evaluate, field_help, OneLineParser


@dataclass
class AnalyzeConfig:
    hard: str = ''           # hard difficulty ('' = the hardest eval difficulty within max_cost)
    max_cost: float = 16.0   # default hard: per-example cost (length x default iterations) at most this x easy
    batch: int = 16          # examples per split; every number is measured on these
    reach_mult: float = 2.0  # iterations to the reached state, as a multiple of the default rule
    power_iters: int = 10    # power iterations before Arnoldi, for the spectral radius
    krylov: int = 24         # Krylov subspace size (Arnoldi, Lanczos, GMRES)
    tol: float = 1e-2        # an eigen/singular value has converged once its Ritz residual is below tol x value
    gmres_tol: float = 1e-4  # GMRES stops at this relative residual (at most 4 restarts)
    eps: float = 1e-3        # finite-difference step, relative to ||e||
    halt_tol: float = 1e-3   # adaptive halting: an example stops once its residual is below this
    overthink: float = 0.05  # final accuracy this far below the peak counts as overthinking
    device: str = 'cpu'      # cpu | cuda | cuda:N | mps
    seed: int = 0            # seeds the examples and the random directions
    json: str = ''           # write every number to this file
    plot: str = ''           # write PNG figures to this folder (needs matplotlib)

    BOUNDS = dict(max_cost='[1, inf)', batch='[1, 2**16]', reach_mult='(0, 1000]', power_iters='[1, 10000]',
                  krylov='[1, 1000]', tol='(0, 1]', gmres_tol='(0, 1)', eps='(0, 1]', halt_tol='[0, inf)',
                  overthink='[0, 1]', seed='[0, 2**63)')   # allowed values (check_fields)

    def validate(self):
        """Raise ValueError with a one-line message for a flag that cannot be meant or a path that cannot be written."""
        check_fields(self)
        pick_device(self.device)
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

# ----------------------------------------------------------------------------- linear algebra per example
# F acts on every example on its own (attention stays inside a sequence), so J_h is block diagonal over the
# batch: a Krylov vector is a (B, N) batch of per-example vectors and every dot product is per row.

def bnorm(v):  # (B, ...) -> (B,)
    return v.flatten(1).norm(dim=1)


def arnoldi(A, v0, m):
    """m Arnoldi steps on every row: Q (B, m+1, N) orthonormal, H (B, m+1, m) with A Q[:, :m] = Q H."""
    B, N = v0.shape
    m = min(m, N)
    Q, H = v0.new_zeros(B, m + 1, N), v0.new_zeros(B, m + 1, m)
    Q[:, 0] = v0 / bnorm(v0).clamp_min(TINY)[:, None]
    for j in range(m):
        w = A(Q[:, j])
        for _ in range(2):                                      # Gram-Schmidt, twice for orthogonality
            c = torch.einsum('bkn,bn->bk', Q[:, :j + 1], w)
            w = w - torch.einsum('bkn,bk->bn', Q[:, :j + 1], c)
            H[:, :j + 1, j] += c
        H[:, j + 1, j] = bnorm(w)
        Q[:, j + 1] = w / H[:, j + 1, j].clamp_min(TINY)[:, None]
    return Q, H


def ritz(A, v0, m, which, tol, symmetric=False):
    """The extreme Ritz value (B,) of A on an m-step Krylov space, which = 'abs' (largest modulus), 'max' or
    'min', and whether it converged: its residual ||A y - theta y|| is below tol |theta|."""
    H = arnoldi(A, v0, m)[1].double().cpu()
    m, bad = H.size(2), ~torch.isfinite(H).flatten(1).all(1)
    H = H.nan_to_num(0.0, 0.0, 0.0)
    vals, vecs = torch.linalg.eigh((H[:, :m] + H[:, :m].mT) / 2) if symmetric else torch.linalg.eig(H[:, :m])
    size = vals.abs() if which == 'abs' else vals.real
    i = (-size if which == 'min' else size).argmax(1, keepdim=True)
    theta, res = size.gather(1, i)[:, 0], H[:, m, m - 1] * vecs[:, -1].abs().gather(1, i)[:, 0]
    converged = res <= tol * theta.abs()
    theta[bad], converged[bad] = math.nan, False
    return theta.to(v0.device), converged.to(v0.device)


def jacobian_ops(F, h, e):
    """v -> J_h v (forward mode) and u -> J_h^T u (one backward graph, reused) at (h, e), on (B, N) rows."""
    f = lambda h_: F(h_, e)

    def J(v):
        with sdpa_kernel(SDPBackend.MATH):                      # fused attention kernels lack forward mode
            return jvp(f, (h,), (v.view_as(h),))[1].flatten(1)
    pullback = vjp(f, h)[1]
    return J, lambda u: pullback(u.view_as(h))[0].flatten(1)


# ----------------------------------------------------------------------------- diagnostics of any step F(h, e)

@torch.no_grad()
def iterate(F, h, e, n_iters, halt_tol=0.0):
    """n_iters iterations h <- F(h, e). Returns the last state, the relative residuals (n_iters, B), and per
    example the state at which its residual first fell below halt_tol and that iteration (else the last)."""
    res, h_halt, t_halt = [], h, torch.full((h.size(0),), n_iters, device=h.device)
    rows = (-1,) + (1,) * (h.dim() - 1)
    for t in range(n_iters):
        h_next = F(h, e)
        res.append(bnorm(h_next - h) / bnorm(h).clamp_min(TINY))
        stop = (res[-1] < halt_tol) & (t_halt == n_iters)
        h_halt, h = torch.where(stop.view(rows), h_next, h_halt), h_next
        t_halt[stop] = t + 1
    return h, torch.stack(res), torch.where((t_halt == n_iters).view(rows), h, h_halt), t_halt


def spectral_radius(F, h, e, power_iters=10, krylov=24, tol=1e-2):
    """Per-example spectral radius of J_h: power iteration, then Arnoldi's largest Ritz value from the power
    vector. Power iteration alone can settle on a wrong value (complex dominant pairs make ||J v|| oscillate,
    near-ties make it creep), so Arnoldi always runs. Returns rho, converged, power_off (power iteration's
    estimate off by more than tol) (B,)."""
    J = jacobian_ops(F, h, e)[0]
    v = torch.randn_like(h).flatten(1)
    for _ in range(power_iters):
        v = v / bnorm(v).clamp_min(TINY)[:, None]
        v = J(v)
    power = bnorm(v)                                            # ||J v|| for the last unit v
    rho, converged = ritz(J, v, krylov, 'abs', tol)
    return rho, converged, (power - rho).abs() > tol * rho


def singular_values(F, h, e, krylov=24, tol=1e-2):
    """||J_h|| and sigma_min(I - J_h) per example, by Lanczos on J^T J and on (I-J)^T (I-J) (a JVP and a VJP
    per step). Small singular values converge slowly, but the smallest Ritz value never undershoots: sigma_min
    is an upper bound. Returns norm_J, its converged, sigma_min, its converged (B,)."""
    J, JT = jacobian_ops(F, h, e)
    v0 = torch.randn_like(h).flatten(1)

    def MtM(v):                                                 # (I - J)^T (I - J) v
        u = v - J(v)
        return u - JT(u)
    norm2, norm_ok = ritz(lambda v: JT(J(v)), v0, krylov, 'max', tol, symmetric=True)
    smin2, sigma_ok = ritz(MtM, v0, krylov, 'min', tol, symmetric=True)
    return norm2.clamp_min(0).sqrt(), norm_ok, smin2.clamp_min(0).sqrt(), sigma_ok


def ift_sensitivity(F, h, e, v, krylov=24, tol=1e-4, restarts=4):
    """||dh*|| / ||v|| per example for dh* = (I - J_h)^{-1} J_x v (implicit function theorem), by restarted
    GMRES on u -> u - J_h u. Returns the ratio and whether GMRES reached tol (B,)."""
    J = jacobian_ops(F, h, e)[0]
    with sdpa_kernel(SDPBackend.MATH):
        b = jvp(lambda e_: F(h, e_), (e,), (v,))[1].flatten(1)  # J_x v
    A = lambda u: u - J(u)
    x, r = torch.zeros_like(b), b
    for _ in range(restarts):
        done = bnorm(r) <= tol * bnorm(b)
        if done.all():
            break
        Q, H = arnoldi(A, r, krylov)
        rhs = torch.zeros(len(b), H.size(1), 1, dtype=torch.float64)
        rhs[:, 0, 0] = bnorm(r).double().cpu()
        y = torch.linalg.lstsq(H.double().cpu().nan_to_num(), rhs).solution[..., 0]   # min ||beta e_1 - H y||
        x = x + torch.einsum('bkn,bk->bn', Q[:, :-1], y.to(x)) * ~done[:, None]
        r = b - A(x)
    ratio = torch.where(torch.isfinite(b).all(1), bnorm(x) / bnorm(v), math.nan)
    return ratio, bnorm(r) <= tol * bnorm(b)


def fd_sensitivity(F, init, e, h, v, n_iters, eps=1e-3):
    """||h*(e + eps v) - h*(e)|| / (eps ||v||), with h = h*(e) reached in n_iters iterations from init(e): the
    reached state's dependence on the input along v through every path, the initial state included."""
    return bnorm(iterate(F, init(e + eps * v), e + eps * v, n_iters)[0] - h) / (eps * bnorm(v))


def alignment(F, e, h_ref, n_iters):
    """Asymptotic alignment (Anil et al. 2022): cosine between each example's reached state h_ref and where
    n_iters iterations take it from other starts. Returns {start: (B,) cosines}; 1 = path independent."""
    starts = {'other': h_ref.roll(1, 0), 'noise': torch.randn_like(h_ref), 'zeros': torch.zeros_like(h_ref)}
    cos = {}
    for name, h0 in starts.items():
        h = iterate(F, h0, e, n_iters)[0]
        cos[name] = (h * h_ref).flatten(1).sum(1) / (bnorm(h) * bnorm(h_ref)).clamp_min(TINY)
    return cos


# ----------------------------------------------------------------------------- one checkpoint

def stats(x, **extra):
    """{median, mean, max} over examples; None if any is NaN/inf (a diverged example is never averaged away)."""
    x = x.detach().double().cpu()
    ok = bool(torch.isfinite(x).all())
    return dict(median=x.median().item() if ok else None, mean=x.mean().item() if ok else None,
                max=x.max().item() if ok else None, **extra)


def analyze_split(model, task, diff, split, cfg):
    x = split['x'].to(cfg.device)
    rule = model.default_iters(x.size(1))
    n = max(1, round(cfg.reach_mult * rule))
    F, init = model.step, lambda e: model.initial_state(e, torch.Generator(e.device).manual_seed(cfg.seed))
    out = dict(difficulty=diff, n=len(x), length=x.size(1), rule_iters=rule, reach_iters=n, seconds={})
    clock = [time.time()]

    def lap(name):
        out['seconds'][name], clock[0] = round(time.time() - clock[0], 2), time.time()
    with torch.no_grad():
        e = model.embed(x)                                      # (B, T, d)
    h, res, h_halt, t_halt = iterate(F, init(e), e, n, cfg.halt_tol)
    out['diverged'] = int((~torch.isfinite(h.flatten(1)).all(1)).sum())
    out['residual'] = stats(res[-1])
    out['residual_curve'] = [r.median().item() if torch.isfinite(r).all() else None for r in res.double().cpu()]
    lap('reach')
    rho, ok, power_off = spectral_radius(F, h, e, cfg.power_iters, cfg.krylov, cfg.tol)
    out['rho'] = stats(rho, converged=ok.float().mean().item(), power_off=power_off.float().mean().item())
    lap('spectral')
    norm_J, norm_ok, sigma_min, sigma_ok = singular_values(F, h, e, cfg.krylov, cfg.tol)
    out['norm_J'] = stats(norm_J, converged=norm_ok.float().mean().item())
    out['sigma_min'] = stats(sigma_min, converged=sigma_ok.float().mean().item())
    lap('singular')
    v = torch.randn_like(e)
    v = v * (bnorm(e) / bnorm(v)).view(-1, 1, 1)                # ||v|| = ||e||: eps is a relative step
    ift, ift_ok = ift_sensitivity(F, h, e, v, cfg.krylov, cfg.gmres_tol)
    fd = fd_sensitivity(F, init, e, h, v, n, cfg.eps)
    out['sens_ift'], out['sens_fd'] = stats(ift, converged=ift_ok.float().mean().item()), stats(fd)
    lap('sensitivity')
    cos = alignment(F, e, h, n)
    out['align'] = stats(torch.stack(list(cos.values())).mean(0), **{k: stats(c)['mean'] for k, c in cos.items()})
    lap('alignment')
    counts = sorted({rule, n} | {int(c) for c in np.geomspace(1, n, 16).round()})
    first_bad = next((t + 1 for t, r in enumerate(res) if not torch.isfinite(r).all()), math.inf)
    curve = {t: s[task.headline] if t < first_bad else None for t, s in evaluate(model, task, split, counts, cfg.batch).items()}
    peak_t = max((t for t in counts if curve[t] is not None), key=curve.get, default=None)
    peak = curve.get(peak_t)
    out['accuracy'] = dict(curve=curve, rule=curve[rule], peak=peak, peak_iters=peak_t, final=curve[n],
                           overthinking=None if curve[n] is None else curve[n] < peak - cfg.overthink)
    with torch.no_grad():
        halt_acc = task.score(model.readout(h_halt).float().cpu(), split)[task.headline]
    out['halting'] = dict(accuracy=None if out['diverged'] else halt_acc, mean_iters=t_halt.float().mean().item(),
                          halted=(t_halt < n).float().mean().item())
    lap('accuracy')
    return out


def prepare(path, cfg):
    """Load a checkpoint, its task and its easy and hard example sets (a one-line error for any failure)."""
    ckpt = load_checkpoint(path)
    tc = ckpt['config'].get('train', {})
    task = get_task(tc.get('task', ''))
    model = LoopedTransformer.from_checkpoint(path).to(cfg.device).requires_grad_(False)
    easy = task.parse_difficulty(tc['train_difficulty']) if tc.get('train_difficulty') else task.train_difficulty
    splits = {'easy': (easy, task.eval_set(easy, cfg.batch, cfg.seed))}
    cost = lambda split: split['x'].size(1) * model.default_iters(split['x'].size(1))   # per example
    for hard in [task.parse_difficulty(cfg.hard)] if cfg.hard else reversed(task.eval_difficulties):
        splits['hard'] = (hard, task.eval_set(hard, cfg.batch, cfg.seed))
        if cfg.hard or cost(splits['hard'][1]) <= cfg.max_cost * cost(splits['easy'][1]):
            break
    for name, (diff, split) in splits.items():
        if cfg.reach_mult * model.default_iters(split['x'].size(1)) > MAX_ITERS:
            raise ValueError(f"{path}: reaching the fixed point on {name} inputs ({diff}) would take {cfg.reach_mult:g} x "
                             f"{model.default_iters(split['x'].size(1))} iterations, above {MAX_ITERS}; lower --reach_mult or --hard")
    return dict(path=path, step=ckpt.get('step'), model=model, task=task, splits=splits)


def analyze_checkpoint(c, cfg):
    torch.manual_seed(cfg.seed)                                 # the same random directions for every checkpoint
    m = c['model'].cfg
    return dict(path=c['path'], task=c['task'].name, step=c['step'], recall=m.recall, inner_norm=m.inner_norm,
                outer_norm=m.outer_norm, variant=f"{m.recall}/{m.inner_norm}/{'outer' if m.outer_norm else 'no-outer'}",
                **{name: analyze_split(c['model'], c['task'], *c['splits'][name], cfg) for name in ('easy', 'hard')})


# ----------------------------------------------------------------------------- reporting

def fmt(v, spec='.3g', then=''):
    """A number (and then a suffix), or 'diverged' for None."""
    return 'diverged' if v is None else format(v, spec) + then


def pct(v, then=''):
    return fmt(None if v is None else 100 * v, '.1f', then)


ROWS = [  # (label, cell of one split): the table of one checkpoint
    ('iterations: rule / reach', lambda s: f"{s['rule_iters']} / {s['reach_iters']}"),
    ('diverged examples', lambda s: f"{s['diverged']} of {s['n']}"),
    ('residual at the end', lambda s: fmt(s['residual']['median'], '.2e')),
    ('spectral radius (max) conv', lambda s: fmt(s['rho']['median'], '.3f', f" ({fmt(s['rho']['max'], '.3f')}) {s['rho']['converged']:.0%}")),
    ('||J_h|| conv', lambda s: fmt(s['norm_J']['median'], '.3f', f" {s['norm_J']['converged']:.0%}")),
    ('sigma_min(I - J_h) at most', lambda s: fmt(s['sigma_min']['median'], '.3f')),
    ('sensitivity IFT / FD', lambda s: f"{fmt(s['sens_ift']['median'])} / {fmt(s['sens_fd']['median'])}"),
    ('alignment other/noise/zeros', lambda s: 'diverged' if s['align']['median'] is None
     else '/'.join(f"{s['align'][k]:.2f}" for k in ('other', 'noise', 'zeros'))),
    ('accuracy % at the rule', lambda s: pct(s['accuracy']['rule'])),
    ('peak % @ iterations', lambda s: pct(s['accuracy']['peak'], f" @ {s['accuracy']['peak_iters']}")),
    ('final %', lambda s: pct(s['accuracy']['final'], ' overthinks' if s['accuracy']['overthinking'] else '')),
    ('halting % / mean iterations', lambda s: pct(s['halting']['accuracy'], f" / {s['halting']['mean_iters']:.1f}")),
]

COLUMNS = [  # (header, cell of one split): the side-by-side table, one row per checkpoint
    ('residual', lambda s: fmt(s['residual']['median'], '.1e')), ('rho', lambda s: fmt(s['rho']['median'], '.3f')),
    ('sigma_min', lambda s: fmt(s['sigma_min']['median'], '.3f')), ('||J||', lambda s: fmt(s['norm_J']['median'], '.3f')),
    ('sens_ift', lambda s: fmt(s['sens_ift']['median'])), ('sens_fd', lambda s: fmt(s['sens_fd']['median'])),
    ('align', lambda s: fmt(s['align']['median'], '.3f')), ('acc %', lambda s: pct(s['accuracy']['rule'])),
    ('peak@it', lambda s: pct(s['accuracy']['peak'], f"@{s['accuracy']['peak_iters']}")),
    ('halt %', lambda s: pct(s['halting']['accuracy'])), ('halt it', lambda s: f"{s['halting']['mean_iters']:.1f}"),
]


def print_checkpoint(r):
    print(f"\n{r['path']} | {r['task']} | {r['variant']} | step {r['step']} | medians over examples")
    print(f"{'':28}" + ''.join(f"{name + ' (' + str(r[name]['difficulty']) + ')':>26}" for name in ('easy', 'hard')))
    for label, cell in ROWS:
        print(f"{label:28}{cell(r['easy']):>26}{cell(r['hard']):>26}")
    for name in ('easy', 'hard'):
        print(f"seconds {name}: " + ', '.join(f'{k} {v:.1f}' for k, v in r[name]['seconds'].items()))


def print_comparison(records):
    for name in ('easy', 'hard'):
        print(f"\n{name} inputs: medians over examples; acc at the default rule, peak @ iterations, halting acc and mean iterations")
        print(f"{'variant':22}" + ''.join(f'{h:>10}' for h, _ in COLUMNS) + '  checkpoint (difficulty)')
        for r in records:
            print(f"{r['variant']:22}" + ''.join(f'{cell(r[name]):>10}' for _, cell in COLUMNS) + f"  {r['path']} ({r[name]['difficulty']})")


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
    for name, ylabel in (('residual', 'relative residual (median)'), ('accuracy', 'accuracy'), ('spectral', 'spectral radius of J_h')):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, r in enumerate(records):
            for j, (split, style) in enumerate((('easy', '-'), ('hard', '--'))):
                s, kw = r[split], dict(color=f'C{i}', label=f"{r['variant']} {split} ({r[split]['difficulty']})")
                if name == 'residual':
                    ax.semilogy(range(1, s['reach_iters'] + 1), [nan(v) for v in s['residual_curve']], style, **kw)
                elif name == 'accuracy':
                    ax.plot(list(s['accuracy']['curve']), [nan(v) for v in s['accuracy']['curve'].values()], style, marker='.', **kw)
                else:                                           # median, with a bar up to the max
                    ax.errorbar(2 * i + j, nan(s['rho']['median']), yerr=[[0], [nan(s['rho']['max']) - nan(s['rho']['median'])]],
                                fmt='os'[j], capsize=3, **kw)
        if name == 'spectral':
            ax.axhline(1, color='gray', lw=0.8)
            ax.set_xticks([])
        ax.set(xlabel='checkpoints' if name == 'spectral' else 'iterations', ylabel=ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f'{name}.png'), dpi=120)
        plt.close(fig)
    print(f"wrote residual.png, accuracy.png, spectral.png to {out_dir}")


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
