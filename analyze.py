"""
Stability diagnostics of the fixed-point iteration, test-time compute curves, and a side-by-side
comparison of checkpoints.

    python analyze.py out/ckpt.pt
    python analyze.py out_std/ckpt.pt out_none/ckpt.pt --json diag.json --plot figs

With F(h, e) = model.step(h, e) one iteration and e = model.embed(x), on --batch easy inputs (the
checkpoint's training difficulty) and --batch hard ones (--hard), the loop runs reach_mult times the
model's default iteration count to a reached state h*. Then, per example:

    residual   ||h_{t+1} - h_t|| / ||h_t|| per iteration; small at the end: h* is a fixed point
    rho        spectral radius of J_h = dF/dh at h* (< 1: h* attracts); power iteration, then Arnoldi
               (Ritz values) where ||J v|| has not settled (a complex dominant pair makes it oscillate)
    norm_J     ||J_h||, the largest singular value (Lanczos on J^T J)
    sigma_min  smallest singular value of I - J_h (Lanczos on (I-J)^T (I-J)); an upper bound until
               converged. Small: the implicit gradient (I - J_h)^{-T} g blows up
    sens_ift   ||dh*|| / ||v|| with dh* = (I - J_h)^{-1} J_x v (GMRES), J_x = dF/de, v a random input
               direction with ||v|| = ||e||: how the fixed point moves with the input
    sens_fd    the same by central differences, rerunning the loop from e +- eps v: every path counts,
               h_0 = e included. recall 'none' has J_x = 0, so sens_ift = 0 while sens_fd need not be
    align      asymptotic alignment (Anil et al. 2022): cosine between h* and where the loop lands from
               another example's h*, unit Gaussian noise and zeros (1 = path independent)
    accuracy   task.headline after each iteration count (train.evaluate), at the default rule, at its
               peak, at the end (overthinking: final below peak by more than --overthink), and with
               adaptive halting: an example stops once its residual falls below --halt_tol
A NaN or inf anywhere in a statistic makes it null in JSON and 'diverged' in the tables.

--json FILE keys: {'args': {flag: value}, 'checkpoints': [record]}, record = {path, task, step, variant
(recall/inner_norm/outer|no-outer), recall, inner_norm, outer_norm, easy: split, hard: split}, split =
  difficulty, n (examples), length, rule_iters (default iterations), reach_iters, diverged (examples
  whose h* is not finite), residual_curve (median per iteration), and per-example statistics as
  {median, mean, max} plus:
  residual {..}              at reach_iters
  rho {.., converged, arnoldi}   converged: fraction of examples whose estimate passed the check;
  norm_J {.., converged}         arnoldi: fraction that needed Arnoldi
  sigma_min {.., converged}
  sens_ift {.., converged}   GMRES reached --gmres_tol
  sens_fd {..}, sens_gap {..}    |sens_ift - sens_fd| / sens_fd
  align {.., other, noise, zeros}  mean cosine per start
  accuracy {curve: {iters: acc}, rule, peak, peak_iters, final, overthinking}
  halting {accuracy, mean_iters, halted (fraction below tol before reach_iters), tol}
  seconds {reach, spectral, singular, sensitivity, alignment, accuracy}
"""

import json
import math
import os
import time

import numpy as np
import torch
from torch.func import jvp, vjp
from torch.nn.attention import sdpa_kernel, SDPBackend

from looped import LoopedTransformer, CheckpointError, load_checkpoint
from tasks import get_task
from train import evaluate, OneLineParser

TINY = 1e-30

# ----------------------------------------------------------------------------- linear algebra per example
# F acts on each example on its own (attention stays inside a sequence), so J_h is block diagonal over
# the batch: a Krylov vector is a (B, N) batch of per-example vectors, every dot product is per row.


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
        scale = w.norm(dim=1)
        for _ in range(2):                                      # Gram-Schmidt, twice for orthogonality
            c = torch.einsum('bkn,bn->bk', Q[:, :j + 1], w)
            w = w - torch.einsum('bkn,bk->bn', Q[:, :j + 1], c)
            H[:, :j + 1, j] += c
        H[:, j + 1, j] = w.norm(dim=1)
        lost = H[:, j + 1, j] <= 100 * torch.finfo(w.dtype).eps * scale   # invariant subspace found
        if lost.any():                                          # go on from a fresh orthogonal direction
            H[lost, j + 1, j] = 0
            r = torch.randn_like(w[lost])
            for _ in range(2):
                r = r - torch.einsum('bkn,bk->bn', Q[lost, :j + 1], torch.einsum('bkn,bn->bk', Q[lost, :j + 1], r))
            w[lost] = r
        Q[:, j + 1] = w / w.norm(dim=1).clamp_min(TINY)[:, None]
    return Q, H


def ritz(A, v0, m, which, tol, symmetric=False):
    """The extreme Ritz value (B,) of A on an m-step Krylov space: which = 'abs' (largest modulus), 'max' or 'min'.
    converged (B,): it moved by less than tol (relative) between the space's first half and all of it, or its
    residual ||A y - theta y|| is below tol |theta|."""
    _, H = arnoldi(A, v0, m)
    m, H = H.size(2), H.double()
    bad = ~torch.isfinite(H).flatten(1).all(1)
    H = torch.nan_to_num(H, 0.0, 0.0, 0.0)

    def extreme(k):  # the chosen Ritz value after k steps, and its residual
        Hk = H[:, :k, :k]
        vals, vecs = torch.linalg.eigh((Hk + Hk.mT) / 2) if symmetric else torch.linalg.eig(Hk)
        size = vals.abs() if which == 'abs' else vals.real
        i = (size if which != 'min' else -size).argmax(1, keepdim=True)
        return size.gather(1, i)[:, 0], H[:, k, k - 1].abs() * vecs[:, -1].abs().gather(1, i)[:, 0]
    theta, res = extreme(m)
    converged = ((theta - extreme(max(1, m // 2))[0]).abs() <= tol * theta.abs()) | (res <= tol * theta.abs())
    theta[bad], converged[bad] = math.nan, False
    return theta, converged


def jacobian_ops(F, h, e):
    """v -> J_h v (forward mode) and u -> J_h^T u (one backward graph, reused) at (h, e), on (B, N) rows."""
    f = lambda h_: F(h_, e)

    def J(v):
        with sdpa_kernel(SDPBackend.MATH):                      # fused attention has no forward-mode derivative
            return jvp(f, (h,), (v.view_as(h),))[1].flatten(1)
    pullback = vjp(f, h)[1]
    return J, lambda u: pullback(u.view_as(h))[0].flatten(1)


# ----------------------------------------------------------------------------- diagnostics of any step F(h, e)

@torch.no_grad()
def iterate(F, h, e, n_iters, halt_tol=0.0):
    """n_iters iterations h <- F(h, e). Returns the last state, the relative residuals (n_iters, B), and per
    example the state at which its residual first fell below halt_tol with its iteration count (else the last)."""
    res, h_halt, t_halt = [], h, torch.full((h.size(0),), n_iters, device=h.device)
    for t in range(n_iters):
        h_next = F(h, e)
        res.append(bnorm(h_next - h) / bnorm(h).clamp_min(TINY))
        stop = (res[-1] < halt_tol) & (t_halt == n_iters)
        h_halt = torch.where(stop.view(-1, *[1] * (h.dim() - 1)), h_next, h_halt)
        t_halt[stop] = t + 1
        h = h_next
    h_halt = torch.where((t_halt == n_iters).view(-1, *[1] * (h.dim() - 1)), h, h_halt)
    return h, torch.stack(res) if res else h.new_zeros(0, h.size(0)), h_halt, t_halt


def spectral_radius(F, h, e, power_iters=20, krylov=12, tol=1e-2):
    """Per-example spectral radius of J_h: power iteration; where the last 5 estimates of ||J v|| spread by more
    than tol, the largest Ritz value of Arnoldi started from the power vector. Returns rho, converged, arnoldi (B,)."""
    J = jacobian_ops(F, h, e)[0]
    v = torch.randn_like(h).flatten(1)
    v, est = v / bnorm(v)[:, None], []
    for _ in range(power_iters):
        w = J(v)
        est.append(bnorm(w))
        v = w / est[-1].clamp_min(TINY)[:, None]
    last = torch.stack(est[-5:])
    settled = last.max(0).values - last.min(0).values <= tol * last[-1]
    rho, converged = last[-1], settled
    if not settled.all():                                       # Arnoldi on the batch, kept where unsettled
        theta, ok = ritz(J, v, krylov, 'abs', tol)
        rho, converged = torch.where(settled, rho, theta.to(rho.dtype)), settled | ok
    return rho, converged, ~settled


def singular_values(F, h, e, krylov=20, tol=1e-2):
    """||J_h|| and sigma_min(I - J_h) per example by Lanczos on J^T J and (I-J)^T (I-J) (a JVP and a VJP per
    step). The smallest Ritz value never undershoots, so sigma_min is an upper bound. Returns 4 (B,) tensors."""
    J, JT = jacobian_ops(F, h, e)
    v0 = torch.randn_like(h).flatten(1)

    def MtM(v):                                                 # (I - J)^T (I - J) v
        u = v - J(v)
        return u - JT(u)
    norm2, norm_ok = ritz(lambda v: JT(J(v)), v0, krylov, 'max', tol, symmetric=True)
    smin2, sigma_ok = ritz(MtM, v0, krylov, 'min', tol, symmetric=True)
    norm_J, sigma_min = norm2.clamp_min(0).sqrt(), smin2.clamp_min(0).sqrt()
    return norm_J, norm_ok, sigma_min, sigma_ok


def ift_sensitivity(F, h, e, v, krylov=20, restarts=5, tol=1e-4):
    """||dh*|| / ||v|| per example for dh* = (I - J_h)^{-1} J_x v (implicit function theorem), solved by
    restarted GMRES on the operator u -> u - J_h u. Returns the ratio and whether GMRES reached tol (B,)."""
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
        rhs = torch.zeros(len(b), H.size(1), 1, dtype=torch.float64, device=b.device)
        rhs[:, 0, 0] = bnorm(r)
        y = torch.linalg.lstsq(torch.nan_to_num(H.double()), rhs).solution[..., 0]   # min ||beta e_1 - H y||
        x = x + torch.einsum('bkn,bk->bn', Q[:, :-1], y.to(x.dtype)) * ~done[:, None]
        r = b - A(x)
    ratio = bnorm(x) / bnorm(v)
    ratio[~torch.isfinite(b).all(1)] = math.nan
    return ratio, bnorm(r) <= tol * bnorm(b)


def fd_sensitivity(F, init, e, v, n_iters, eps=1e-3):
    """||h*(e + eps v) - h*(e - eps v)|| / (2 eps ||v||): the reached state's dependence on the input along v
    through every path, the initial state h_0 = init(e) included (central differences, n_iters iterations)."""
    hp, hm = (iterate(F, init(e + s * v), e + s * v, n_iters)[0] for s in (eps, -eps))
    return bnorm(hp - hm) / (2 * eps * bnorm(v))


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

def finite(x):
    return x if x is not None and math.isfinite(x) else None


def stats(x, **extra):
    """{median, mean, max} over examples; all None if any is NaN/inf (a diverged example is never averaged away)."""
    x = x.detach().double().cpu()
    ok = bool(torch.isfinite(x).all())
    return dict(median=x.median().item() if ok else None, mean=x.mean().item() if ok else None,
                max=x.max().item() if ok else None, **extra)


def analyze_split(model, task, diff, split, args):
    x = split['x'].to(args.device)
    rule = model.default_iters(x.size(1))
    n = max(1, round(args.reach_mult * rule))
    F, gen = model.step, lambda: torch.Generator(x.device).manual_seed(args.seed)
    init = lambda e: model.initial_state(e, gen())
    out, seconds, clock = dict(difficulty=diff, n=len(x), length=x.size(1), rule_iters=rule, reach_iters=n), {}, [time.time()]

    def lap(name):
        seconds[name] = round(time.time() - clock[0], 2)
        clock[0] = time.time()
    with torch.no_grad():
        e = model.embed(x)                                      # (B, T, d)
    h, res, h_halt, t_halt = iterate(F, init(e), e, n, args.halt_tol)
    out['diverged'] = int((~torch.isfinite(h.flatten(1)).all(1)).sum())
    out['residual'] = stats(res[-1])
    out['residual_curve'] = [finite(r.median().item()) if torch.isfinite(r).all() else None for r in res.double().cpu()]
    lap('reach')
    rho, ok, arn = spectral_radius(F, h, e, args.power_iters, args.krylov, args.tol)
    out['rho'] = stats(rho, converged=ok.float().mean().item(), arnoldi=arn.float().mean().item())
    lap('spectral')
    norm_J, norm_ok, sigma_min, sigma_ok = singular_values(F, h, e, args.krylov, args.tol)
    out['norm_J'] = stats(norm_J, converged=norm_ok.float().mean().item())
    out['sigma_min'] = stats(sigma_min, converged=sigma_ok.float().mean().item())
    lap('singular')
    v = torch.randn_like(e)
    v = v * (bnorm(e) / bnorm(v)).view(-1, 1, 1)                # ||v|| = ||e||: eps is a relative step
    ift, ift_ok = ift_sensitivity(F, h, e, v, args.krylov, args.restarts, args.gmres_tol)
    fd = fd_sensitivity(F, init, e, v, n, args.eps)
    out['sens_ift'] = stats(ift, converged=ift_ok.float().mean().item())
    out['sens_fd'] = stats(fd)
    out['sens_gap'] = stats((ift - fd).abs() / fd.clamp_min(TINY))
    lap('sensitivity')
    cos = alignment(F, e, h, n)
    out['align'] = stats(torch.stack(list(cos.values())).mean(0), **{k: stats(c)['mean'] for k, c in cos.items()})
    lap('alignment')
    counts = sorted({rule, n} | {int(c) for c in np.geomspace(1, n, args.curve_points).round()})
    scores = evaluate(model, task, split, counts, args.batch)
    bad_from = next((t + 1 for t, r in enumerate(res) if not torch.isfinite(r).all()), math.inf)  # first diverged iteration
    curve = {t: (s[task.headline] if t < bad_from else None) for t, s in scores.items()}
    peak_t = max((t for t in counts if curve[t] is not None), key=lambda t: curve[t], default=None)
    peak = curve[peak_t] if peak_t else None
    out['accuracy'] = dict(curve=curve, rule=curve[rule], peak=peak, peak_iters=peak_t, final=curve[n],
                           overthinking=None if curve[n] is None else curve[n] < peak - args.overthink)
    with torch.no_grad():
        halt_acc = task.score(model.readout(h_halt).float().cpu(), split)[task.headline]
    out['halting'] = dict(accuracy=halt_acc if out['diverged'] == 0 else None, mean_iters=t_halt.float().mean().item(),
                          halted=(t_halt < n).float().mean().item(), tol=args.halt_tol)
    lap('accuracy')
    out['seconds'] = seconds
    return out


def prepare(path, args):
    """Load a checkpoint, its task and its easy and hard example sets; every failure is a one-line error."""
    ckpt = load_checkpoint(path)
    tc = ckpt['config'].get('train', {})
    task = get_task(tc.get('task', ''))
    model = LoopedTransformer.from_checkpoint(path).to(args.device).requires_grad_(False)
    easy = task.parse_difficulty(tc['train_difficulty']) if tc.get('train_difficulty') else task.train_difficulty
    splits = {'easy': (easy, task.eval_set(easy, args.batch, args.seed))}
    cost = lambda split: split['x'].size(1) * model.default_iters(split['x'].size(1))   # per example
    for hard in [task.parse_difficulty(args.hard)] if args.hard else reversed(task.eval_difficulties):
        splits['hard'] = (hard, task.eval_set(hard, args.batch, args.seed))
        if args.hard or cost(splits['hard'][1]) <= args.max_cost * cost(splits['easy'][1]):
            break
    return dict(path=path, step=ckpt.get('step'), model=model, task=task, splits=splits)


def analyze_checkpoint(c, args):
    torch.manual_seed(args.seed)                                # same random directions for every checkpoint
    cfg = c['model'].cfg
    return dict(path=c['path'], task=c['task'].name, step=c['step'], recall=cfg.recall, inner_norm=cfg.inner_norm,
                outer_norm=cfg.outer_norm, variant=f"{cfg.recall}/{cfg.inner_norm}/{'outer' if cfg.outer_norm else 'no-outer'}",
                **{name: analyze_split(c['model'], c['task'], *c['splits'][name], args) for name in ('easy', 'hard')})


# ----------------------------------------------------------------------------- reporting

def fmt(v, spec='.3g', then=''):
    """A number (then a suffix), or 'diverged' for None."""
    return 'diverged' if v is None else format(v, spec) + then


def pct(v, then=''):
    return fmt(None if v is None else 100 * v, '.1f', then)


ROWS = [  # (label, cell of one split): the table of one checkpoint
    ('iterations: rule / reach', lambda s: f"{s['rule_iters']} / {s['reach_iters']}"),
    ('diverged examples', lambda s: f"{s['diverged']} of {s['n']}"),
    ('residual at the end', lambda s: fmt(s['residual']['median'], '.2e')),
    ('spectral radius (max) conv', lambda s: fmt(s['rho']['median'], '.3f', f" ({fmt(s['rho']['max'], '.3f')}) {100 * s['rho']['converged']:.0f}%")),
    ('||J_h|| conv', lambda s: fmt(s['norm_J']['median'], '.3f', f" {100 * s['norm_J']['converged']:.0f}%")),
    ('sigma_min(I - J_h) conv', lambda s: fmt(s['sigma_min']['median'], '.3f', f" {100 * s['sigma_min']['converged']:.0f}%")),
    ('sensitivity IFT / FD', lambda s: f"{fmt(s['sens_ift']['median'])} / {fmt(s['sens_fd']['median'])}"),
    ('alignment other/noise/zeros', lambda s: 'diverged' if s['align']['median'] is None
                                    else '/'.join(f"{s['align'][k]:.2f}" for k in ('other', 'noise', 'zeros'))),
    ('accuracy % at rule', lambda s: pct(s['accuracy']['rule'])),
    ('peak % @ iters', lambda s: pct(s['accuracy']['peak'], f" @ {s['accuracy']['peak_iters']}")),
    ('final %', lambda s: pct(s['accuracy']['final'], ' overthinks' if s['accuracy']['overthinking'] else '')),
    ('halting % / mean iters', lambda s: pct(s['halting']['accuracy'], f" / {s['halting']['mean_iters']:.1f}")),
]


def print_checkpoint(r):
    print(f"\n{r['path']} | {r['task']} | {r['variant']} | step {r['step']} | medians over examples")
    print(f"{'':28}" + ''.join(f"{name + ' (' + str(r[name]['difficulty']) + ')':>26}" for name in ('easy', 'hard')))
    for label, cell in ROWS:
        print(f"{label:28}{cell(r['easy']):>26}{cell(r['hard']):>26}")
    for name in ('easy', 'hard'):
        print(f"seconds {name}: " + ', '.join(f'{k} {v:.1f}' for k, v in r[name]['seconds'].items()))


COLUMNS = [  # (header, cell of one split): the side-by-side table, one row per checkpoint
    ('residual', lambda s: fmt(s['residual']['median'], '.1e')), ('rho', lambda s: fmt(s['rho']['median'], '.3f')),
    ('sigma_min', lambda s: fmt(s['sigma_min']['median'], '.3f')), ('||J||', lambda s: fmt(s['norm_J']['median'], '.3f')),
    ('sens_ift', lambda s: fmt(s['sens_ift']['median'])), ('sens_fd', lambda s: fmt(s['sens_fd']['median'])),
    ('align', lambda s: fmt(s['align']['median'], '.3f')), ('acc %', lambda s: pct(s['accuracy']['rule'])),
    ('peak@it', lambda s: pct(s['accuracy']['peak'], f"@{s['accuracy']['peak_iters']}")),
    ('halt %', lambda s: pct(s['halting']['accuracy'])), ('halt it', lambda s: f"{s['halting']['mean_iters']:.1f}"),
]


def print_comparison(records):
    for name in ('easy', 'hard'):
        print(f"\n{name} inputs, medians over examples; acc % at the default rule, peak % @ iterations, halting % and mean iterations")
        print(f"{'variant':22}" + ''.join(f'{h:>10}' for h, _ in COLUMNS) + '  checkpoint')
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
            for split, style in (('easy', '-'), ('hard', '--')):
                s, label = r[split], f"{r['variant']} {split} ({r[split]['difficulty']})"
                if name == 'residual':
                    ax.semilogy(range(1, len(s['residual_curve']) + 1), [nan(v) for v in s['residual_curve']], style, color=f'C{i}', label=label)
                elif name == 'accuracy':
                    ax.plot(list(s['accuracy']['curve']), [nan(v) for v in s['accuracy']['curve'].values()], style, marker='.', color=f'C{i}', label=label)
                    ax.axvline(s['rule_iters'], ls=':', color=f'C{i}', lw=0.8)
                else:
                    ax.errorbar(2 * i + (split == 'hard'), nan(s['rho']['median']), fmt='o' if split == 'easy' else 's', color=f'C{i}', label=label,
                                yerr=[[0], [nan(s['rho']['max']) - nan(s['rho']['median'])]], capsize=3)
        if name == 'spectral':
            ax.axhline(1, color='gray', lw=0.8)
            ax.set_xticks([])
        ax.set_xlabel('checkpoints (median, bar to max)' if name == 'spectral' else 'iterations')
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f'{name}.png'), dpi=120)
        plt.close(fig)
    print(f"wrote residual.png, accuracy.png, spectral.png to {out_dir}")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split('\n\n')[0], formatter_class=__import__('argparse').RawDescriptionHelpFormatter)
    p.add_argument('ckpt', nargs='+', help='checkpoints written by train.py (out_dir/ckpt.pt)')
    p.add_argument('--hard', default='', help="hard difficulty ('' = the hardest eval difficulty within --max_cost)")
    p.add_argument('--max_cost', type=float, default=16, help='default --hard: at most this times the cost (length x iterations) of an easy example')
    p.add_argument('--batch', type=int, default=32, help='examples per split; every number is on these')
    p.add_argument('--reach_mult', type=float, default=2, help='iterations to the reached state, as a multiple of the default rule')
    p.add_argument('--power_iters', type=int, default=20, help='power iterations for the spectral radius')
    p.add_argument('--krylov', type=int, default=16, help='Krylov (Arnoldi / Lanczos / GMRES) subspace size')
    p.add_argument('--restarts', type=int, default=4, help='GMRES restarts')
    p.add_argument('--tol', type=float, default=1e-2, help='relative residual at which an eigen/singular value counts as converged')
    p.add_argument('--gmres_tol', type=float, default=1e-4, help='relative residual at which GMRES stops')
    p.add_argument('--eps', type=float, default=1e-3, help='finite-difference step, relative to ||e||')
    p.add_argument('--halt_tol', type=float, default=1e-3, help='adaptive halting: stop an example once its residual is below this')
    p.add_argument('--overthink', type=float, default=0.05, help='final accuracy this far below the peak counts as overthinking')
    p.add_argument('--curve_points', type=int, default=16, help='iteration counts on the accuracy curve (geometric grid)')
    p.add_argument('--device', default='cpu', help='cpu | cuda | cuda:N | mps')
    p.add_argument('--seed', type=int, default=0, help='seeds the examples and the random directions')
    p.add_argument('--json', default='', help='write every number to this file')
    p.add_argument('--plot', default='', help='write PNG figures to this folder (needs matplotlib)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if min(args.batch, args.power_iters, args.krylov, args.restarts, args.curve_points) < 1 or args.reach_mult <= 0:
        raise SystemExit("analyze.py: error: need batch, power_iters, krylov, restarts, curve_points >= 1 and reach_mult > 0")
    if args.device.startswith('cuda') and not torch.cuda.is_available() or args.device == 'mps' and not torch.backends.mps.is_available():
        raise SystemExit(f"analyze.py: error: --device {args.device} asked for, but it is not available")
    try:
        checkpoints = [prepare(path, args) for path in args.ckpt]   # every file checked before any long run
        records = []
        for c in checkpoints:
            records.append(analyze_checkpoint(c, args))
            print_checkpoint(records[-1])
    except (CheckpointError, ValueError) as err:                    # TaskError is a ValueError
        raise SystemExit(f"analyze.py: error: {str(err).splitlines()[0]}")
    if len(records) > 1:
        print_comparison(records)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'checkpoints': records}, f, indent=1, allow_nan=False)
        print(f"wrote {args.json}")
    if args.plot:
        plot(records, args.plot)


if __name__ == '__main__':
    main()
