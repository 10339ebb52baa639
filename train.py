"""
Train a looped transformer on one of the tasks, then test it on harder inputs with more iterations.

    python train.py --task prefix_sums                     # CPU quick start
    python train.py --task prefix_sums --recall internal --outer_norm false
    python train.py --task sudoku --device cuda --compile  # one GPU
    torchrun --standalone --nproc_per_node 8 train.py --task sudoku   # several GPUs (DDP)

Every field of TrainConfig and LoopedConfig is a flag (--name value or --name=value); flags left out take the
task's defaults, then the dataclass defaults. `python train.py --help` lists them.
"""

import argparse
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from looped import (LoopedConfig, LoopedTransformer, CheckpointError, load_checkpoint, load_weights, config_from_dict,
                    check_types, check_range, check_choice, iterate, one_line, ITER_LIMIT)
from tasks import get_task, token_scores, TaskError


@dataclass
class TrainConfig:
    task: str = 'prefix_sums'      # prefix_sums | sudoku | chess
    out_dir: str = 'out'           # checkpoint (ckpt.pt) and final evaluation (eval.json) go here
    resume: bool = False           # continue the run saved in out_dir
    overwrite: bool = False        # replace an existing checkpoint in out_dir instead of refusing
    seed: int = 1337               # seeds the weights, the data stream and the evaluation sets
    device: str = 'auto'           # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = 'auto'            # auto (bfloat16 autocast on CUDA if supported) | float32 | bfloat16
    compile: bool = False          # torch.compile the loop body (not useful on CPU)
    train_difficulty: str = ''     # what training draws from ('' = the task's default)
    batch_size: int = 64           # global batch, split evenly across DDP processes
    max_steps: int = 2000          # optimizer steps
    lr: float = 1e-3               # peak learning rate (AdamW)
    min_lr: float = 1e-4           # learning rate at the end of the cosine decay
    warmup_steps: int = 100        # linear warmup from 0 to lr
    weight_decay: float = 0.1      # AdamW weight decay on matrices and embeddings
    beta2: float = 0.99            # AdamW second-moment decay
    grad_clip: float = 1.0         # clip the global gradient norm (0 = off)
    alpha: float = 0.5             # progressive loss weight: (1-alpha) CE(T iters) + alpha CE(n+k iters)
    tbptt: int = 0                 # backprop through the last tbptt iterations of the T-iteration term (0 = all)
    overrun: bool = False          # that term runs T + extra iterations, extra ~ U{0..T-1}
    log_interval: int = 50         # steps between log lines
    eval_interval: int = 500       # steps between quick evaluations at the training difficulty (0 = never)
    ckpt_interval: int = 500       # steps between checkpoints (0 = only at the end)
    eval_n: int = 512              # examples per difficulty in evaluations
    eval_difficulties: str = ''    # comma list for the final table ('' = the task's default)
    eval_mults: str = ''           # final table columns: multiples of the default iteration rule ('' = the task's)
    eval_batch: int = 128          # evaluation batch size
    peak_flops: float = 0.0        # device peak FLOP/s for MFU (0 = look the device up in a small table)

    def validate(self, task):
        """Raise ValueError (TaskError) with a one-line message for any field that cannot be meant; returns self."""
        check_types(self)
        inf = math.inf
        for name, lo, hi in (('seed', 0, 2**63), ('batch_size', 1, 2**20), ('max_steps', 0, inf), ('lr', 0, inf),
                             ('min_lr', 0, inf), ('warmup_steps', 0, inf), ('weight_decay', 0, inf), ('beta2', 0, 1),
                             ('grad_clip', 0, inf), ('alpha', 0, 1), ('tbptt', 0, inf), ('log_interval', 1, inf),
                             ('eval_interval', 0, inf), ('ckpt_interval', 0, inf), ('eval_n', 1, 2**20),
                             ('eval_batch', 1, 2**20), ('peak_flops', 0, inf)):
            check_range(self, name, lo, hi, open_hi=name in ('beta2', 'seed'))
        check_choice(self, 'dtype', ('auto', 'float32', 'bfloat16'))
        if not self.out_dir:
            raise ValueError("out_dir must name a folder")
        pick_device(self.device)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}; the schedule decays from lr to min_lr")
        if self.resume and self.overwrite:
            raise ValueError("pass --resume to continue the run in out_dir or --overwrite to replace it, not both")
        self.eval_plan(task)
        return self

    def eval_plan(self, task):
        """The final table's difficulties and iteration multiples: the flags, else the task's."""
        difficulties = ([task.parse_difficulty(s) for s in self.eval_difficulties.split(',')] if self.eval_difficulties
                        else list(task.eval_difficulties))
        try:
            mults = [float(s) for s in self.eval_mults.split(',')] if self.eval_mults else list(task.eval_mults)
        except ValueError:
            mults = [math.nan]
        if not all(math.isfinite(m) and m > 0 for m in mults):
            raise ValueError(f"eval_mults must be a comma list of positive numbers (multiples of the iteration rule), "
                             f"got {self.eval_mults!r}")
        return difficulties, mults


# --------------------------------------------------------------------------------------------- flags

def field_help(cls):
    """The `# comment` after each dataclass field, so the source stays the one place flags are explained."""
    return dict(re.findall(r'^\s+(\w+): \w+ = .*?#\s*(.*)$', inspect.getsource(cls), re.M))


def str2bool(s):
    if s.lower() in ('1', 'true', 'yes', 'on'):
        return True
    if s.lower() in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_fields(parser, cls, title, show_defaults=True):
    """One flag per dataclass field, typed like its default; left out, a flag is None."""
    group, helps = parser.add_argument_group(title), field_help(cls)
    for f in fields(cls):
        kind = str2bool if isinstance(f.default, bool) else type(f.default)
        extra = dict(nargs='?', const=True) if kind is str2bool else {}
        shown = f' [{f.default}]' if show_defaults else ''
        group.add_argument(f'--{f.name}', type=kind, default=None, help=helps.get(f.name, '') + shown, **extra)


def parse_args(argv=None):
    """The flags given on the command line as two dicts: TrainConfig fields, LoopedConfig fields."""
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(parser, TrainConfig, 'training ([default]; a task may set its own: train_defaults in tasks.py)')
    add_fields(parser, LoopedConfig, 'model (defaults depend on the task: model_defaults in tasks.py)', False)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    model_fields = {f.name for f in fields(LoopedConfig)}
    return ({k: v for k, v in args.items() if k not in model_fields},
            {k: v for k, v in args.items() if k in model_fields})


# --------------------------------------------------------------------------------------------- setup

PEAK_BF16_FLOPS = {'H100': 989e12, 'H200': 989e12, 'H800': 989e12, 'A100': 312e12, 'A800': 312e12, 'L40S': 362e12,
                   'L4': 121e12, 'A10': 125e12, '4090': 165e12, '3090': 71e12, 'V100': 125e12, 'T4': 65e12}


def pick_device(name):
    """torch.device for auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps, or a one-line ValueError."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if not re.fullmatch(r'cpu|mps|cuda(:\d+)?', name):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"device {name} asked for, but no CUDA device is available")
    if name.startswith('cuda:') and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"device {name} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if name == 'mps' and not torch.backends.mps.is_available():
        raise ValueError("device mps asked for, but MPS is not available")
    return torch.device(name)


def setup_device(tc):
    """Returns (device, rank, world_size); starts torch.distributed under torchrun."""
    ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    device = str(pick_device(tc.device))
    if ddp:
        if device.startswith('cuda'):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return torch.device(device), rank, world


def autocast_context(tc, device):
    bf16 = tc.dtype == 'bfloat16' or (tc.dtype == 'auto' and device.type == 'cuda' and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def peak_flops(tc, device):
    if tc.peak_flops or device.type != 'cuda':
        return tc.peak_flops
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), 0.0)


def lr_at(step, tc):
    """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def make_optimizer(model, tc):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{'params': decay, 'weight_decay': tc.weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, tc.beta2))


# --------------------------------------------------------------------------------------------- loss

def token_cross_entropy(logits, y):
    """Cross-entropy per token: logits (B, L, C), y (B, L) with -100 where unlabelled."""
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


class ProgressiveLoss(nn.Module):
    """The training objective (Bansal et al. 2022), one module so DDP sees one forward per step:

        loss = (1 - alpha) * CE(readout(h_T)) + alpha * CE(readout(h'_{n+k}))

    h_T: T = default_iters(L) iterations (+ extra with overrun), gradient through the last `tbptt` only if set;
    h': from h_n detached, k more iterations with gradient, n ~ U{0..T-1}, k ~ U{1..T-n} (draw_iters).
    CE is the task's loss where it has one, else per-token cross-entropy."""

    def __init__(self, model, alpha, tbptt, compile=False, loss=token_cross_entropy):
        super().__init__()
        self.model, self.alpha, self.tbptt, self.loss = model, alpha, tbptt, loss
        self.step = torch.compile(model.step) if compile else model.step

    def forward(self, x, y, n, k, noise_gen=None, extra=0):
        """x, y: (B, L). Returns the loss, the logits of the last term, and the iterations run forward and
        with gradient (for FLOP counting)."""
        m, T = self.model, self.model.default_iters(x.size(1)) + extra
        e = m.embed(x)                                              # (B, L, d)
        h = m.initial_state(e, noise_gen)
        main_iters = T if self.alpha < 1 else n                     # alpha = 1: only the progressive term
        no_grad = n if self.alpha == 1 else max(0, T - self.tbptt) if self.tbptt else 0   # leading, gradient-free
        branch = h.detach() if n == 0 else None
        states = iterate(self.step, h, e, main_iters)
        for t in range(1, main_iters + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t > no_grad):
                h = next(states)[0]
            if t == n:
                branch = h.detach()
        loss, logits = 0.0, None
        if self.alpha > 0:
            for branch, _, _ in iterate(self.step, branch, e, k):
                pass
            logits = m.readout(branch)
            loss = loss + self.alpha * self.loss(logits, y)
        if self.alpha < 1:
            logits = m.readout(h)
            loss = loss + (1 - self.alpha) * self.loss(logits, y)
        k = k if self.alpha > 0 else 0
        return loss, logits, main_iters + k, main_iters - no_grad + k


def draw_iters(T, gen, overrun=False):
    """n, k of the progressive term and the main term's extra iterations (ProgressiveLoss)."""
    n = int(torch.randint(0, T, (1,), generator=gen))
    k = int(torch.randint(1, T - n + 1, (1,), generator=gen))
    extra = int(torch.randint(0, T, (1,), generator=gen)) if overrun else 0
    return n, k, extra


# --------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, task, split, counts, batch_size=128, ctx=nullcontext()):
    """Task scores of `split` after each entry of `counts`: a number of iterations, or 'rule' for the model's
    default rule (model.run, halting included). The numbers share one pass of their maximum, read out along the
    way. Returns {count: {metric: value}} and the iterations the rule used per example (N,), or None."""
    model.eval()
    device = next(model.parameters()).device
    fixed = sorted({c for c in counts if c != 'rule'})
    logits = {c: [] for c in counts}
    used = []
    for i in range(0, len(split['x']), batch_size):
        x = split['x'][i:i + batch_size].to(device)
        with ctx:
            e = model.embed(x)
            for t, (h, _, _) in enumerate(iterate(model.step, model.initial_state(e), e, max(fixed, default=0)), 1):
                if t in logits:
                    logits[t].append(model.readout(h).float().cpu())
            if 'rule' in counts:
                out, n = model.run(x)
                logits['rule'].append(out.float().cpu())
                used.append(n.cpu())
    scores = {c: task.score(torch.cat(v), split) for c, v in logits.items()}
    return scores, torch.cat(used) if used else None


def final_table(model, task, tc, ctx):
    """Accuracy (task.headline) on every evaluation difficulty against test-time iterations, as multiples of the
    default rule (x1 is the rule itself); with a halting rule (cfg.halt_tol), the rule itself ('halt') and the
    mean iterations it used. Rows whose rule grows with length use eval_n x block_size / length examples (at
    least 32). Each row also holds a curve: accuracy at iterations spaced by sqrt(2), for plot.py."""
    cfg, head = model.cfg, task.headline
    difficulties, mults = tc.eval_plan(task)
    rows, halts = [], cfg.halt_tol > 0
    print(f"\n{head} accuracy (%) on fresh examples, against test-time iterations (multiples of the default rule):")
    print(f"{'difficulty':>10} | {'n':>5} | {'rule':>5} |" + ''.join(f"{'x' + format(m, 'g'):>7}" for m in mults) +
          (f" | {'halt':>5} {'iters':>6}" if halts else '') + ' | seconds')
    for difficulty in difficulties:
        t0 = time.time()
        split = task.eval_set(difficulty, tc.eval_n, tc.seed)
        L = split['x'].size(1)
        if cfg.scale_iters and L > cfg.block_size:
            keep = max(min(32, tc.eval_n), tc.eval_n * cfg.block_size // L)
            split = {k: v[:keep] for k, v in split.items()}
        rule = model.default_iters(L)
        iters = [max(1, round(m * rule)) for m in mults]
        curve = {max(1, round(rule * 2 ** (j / 2))) for j in range(-6, 1 + int(2 * math.log2(max(mults))))}
        scores, used = evaluate(model, task, split, [*iters, *curve] + ['rule'] * halts, tc.eval_batch, ctx)
        row = {'difficulty': difficulty, 'n': len(split['x']), 'rule_iters': rule, 'mults': mults, 'iters': iters,
               'scores': {str(t): scores[t] for t in iters},
               'curve': {str(t): scores[t][head] for t in sorted(curve | set(iters))}}
        cells = ''.join(f"{100 * scores[t][head]:7.1f}" for t in iters)
        if halts:
            row['halt'] = {'scores': scores['rule'], 'mean_iters': used.float().mean().item(),
                           'max_iters': used.max().item()}
            cells += f" | {100 * scores['rule'][head]:5.1f} {row['halt']['mean_iters']:6.1f}"
        row['seconds'] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"{str(difficulty):>10} | {len(split['x']):5d} | {rule:5d} |{cells} | {row['seconds']:7.1f}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, optimizer, tc, step, gen):
    """The model, optimizer, config, step and random streams, written atomically (write_atomic)."""
    ckpt = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step,
            'config': {'model': asdict(model.cfg), 'train': asdict(tc)},
            'data_rng': gen.get_state(), 'torch_rng': torch.get_rng_state()}
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def write_atomic(path, write):
    """write(tmp), then rename tmp over path: the old file stays whole until the new one is. A one-line
    CheckpointError if it cannot be written (disk full, folder gone)."""
    tmp = f'{path}.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"cannot write {path} ({one_line(err)})")


def dump_json(obj, path):
    with open(path, 'w') as f:
        json.dump(obj, f, indent=1)


RESUME_MAY_CHANGE = {'out_dir', 'resume', 'overwrite', 'device', 'compile', 'max_steps', 'log_interval',
                     'eval_interval', 'ckpt_interval', 'eval_n', 'eval_difficulties', 'eval_mults', 'eval_batch',
                     'peak_flops'}


def check_resumable(ckpt, cfg, tc, path):
    """A run resumes only with the config it was started with (fields that leave the training trajectory alone
    excepted), from a checkpoint train.py wrote with its optimizer state."""
    missing = sorted({'optimizer', 'step', 'data_rng', 'torch_rng'} - set(ckpt))
    if missing:
        raise CheckpointError(f"{path} holds no training state to resume from (missing: {', '.join(missing)}); "
                              f"start a new run, or load its weights with LoopedTransformer.from_checkpoint")
    config_from_dict(ckpt['config']['model'], path)        # a readable config first: unknown keys, wrong types
    changed = sorted(k for k in asdict(cfg) if ckpt['config']['model'].get(k) != getattr(cfg, k))
    if changed:
        raise CheckpointError(f"{path} was trained with a different model config (differs in: {', '.join(changed)})")
    saved = ckpt['config'].get('train', {})
    changed = sorted(k for k in asdict(tc) if k not in RESUME_MAY_CHANGE and saved.get(k) != getattr(tc, k))
    if changed:
        raise CheckpointError(f"{path} was trained with a different training config "
                              f"(differs in: {', '.join(changed)})")


def restore(ckpt, model, optimizer, gen, path):
    """Load a checked checkpoint's weights, optimizer and random streams; returns its step."""
    load_weights(model, ckpt['model'], path)
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
        gen.set_state(ckpt['data_rng'])
        torch.set_rng_state(ckpt['torch_rng'])
        return int(ckpt['step'])
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path} has a damaged training state ({one_line(err)})")


def claim_out_dir(out_dir):
    """Create out_dir and take it with a lock file holding our host and pid, made by an atomic link; a lock left
    by a dead process on this host is taken over. Returns a function that releases it (and removes out_dir if
    this run made it and left it empty)."""
    lock, me = os.path.join(out_dir, 'run.lock'), f'{socket.gethostname()} {os.getpid()}'
    made = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        tmp = f'{lock}.{os.getpid()}.tmp'
        with open(tmp, 'w') as f:
            f.write(me)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, lock)
                    break
                except FileExistsError:
                    owner = open(lock).read().split()
                    host, pid = (owner[0], int(owner[1])) if len(owner) == 2 and owner[1].isdigit() else ('?', 0)
                    if host == me.split()[0] and pid and not pid_alive(pid):
                        os.remove(lock)                 # stale: its run died without releasing it
                        continue
                    raise SystemExit(f"train.py: error: {out_dir} is in use by another run (pid {pid} on {host}); "
                                     f"wait for it or choose another --out_dir (delete {lock} if that run is gone)")
        finally:
            os.remove(tmp)
    except OSError as err:
        raise SystemExit(f"train.py: error: cannot use --out_dir {out_dir}: {err.strerror} ({err.filename})")

    def release():
        try:
            if open(lock).read() == me:
                os.remove(lock)
            if made:
                os.rmdir(out_dir)                           # fails, as it should, unless empty
        except OSError:
            pass
    return release


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                 # someone else's process
        return True
    return True


# --------------------------------------------------------------------------------------------- main

def configure(argv=None):
    """Every flag, checked against the task before anything is built: (tc, cfg, task, training difficulty),
    or a one-line error saying what is allowed."""
    train_overrides, model_overrides = parse_args(argv)
    try:
        task = get_task(train_overrides.get('task', TrainConfig.task))
        tc = TrainConfig(**{**task.train_defaults, **train_overrides}).validate(task)   # dataclass < task < flags
        train_difficulty = (task.parse_difficulty(tc.train_difficulty) if tc.train_difficulty
                            else task.train_difficulty)
        need = task.model_defaults(train_difficulty)
        cfg = LoopedConfig(**{**need, **model_overrides}).validate()
        for name in ('vocab_size', 'n_classes'):
            if getattr(cfg, name) < need[name]:
                raise ValueError(f"task {task.name} needs {name} >= {need[name]}, got {getattr(cfg, name)}")
        if cfg.pair_head != need.get('pair_head', False):
            raise ValueError(f"task {task.name} needs pair_head {need.get('pair_head', False)}, got {cfg.pair_head}")
        difficulties, mults = tc.eval_plan(task)
        for difficulty in [train_difficulty, *difficulties]:
            L = task.model_defaults(difficulty)['block_size']           # the length of the task's inputs there
            try:
                cfg.check_input(L)
            except ValueError as err:
                raise ValueError(f"difficulty {difficulty}: {err}")
            if round(max(mults) * cfg.default_iters(L)) > ITER_LIMIT:
                raise ValueError(f"the final table would run {max(mults):g} x {cfg.default_iters(L)} iterations at "
                                 f"difficulty {difficulty}, above {ITER_LIMIT}; "
                                 f"lower --eval_mults or --eval_difficulties")
    except ValueError as err:                                      # TaskError is a ValueError
        raise SystemExit(f"train.py: error: {err}")
    return tc, cfg, task, train_difficulty


def main(argv=None):
    tc, cfg, task, train_difficulty = configure(argv)
    device, rank, world = setup_device(tc)
    if tc.batch_size % world:
        raise SystemExit(f"train.py: error: batch_size {tc.batch_size} is not divisible by {world} processes")
    release = claim_out_dir(tc.out_dir) if rank == 0 else (lambda: None)
    path, saved = os.path.join(tc.out_dir, 'ckpt.pt'), {}   # saved: what this run has written, for the last word
    handler = signal.getsignal(signal.SIGINT)
    try:
        run(tc, cfg, task, train_difficulty, device, rank, world, saved)
    except KeyboardInterrupt:                               # outside the training loop (setup, the final table)
        done = f"{path} holds step {saved['step']}" if 'step' in saved else f"nothing was written to {tc.out_dir}"
        print(f"interrupted {saved.get('phase', 'before training')}: {done}", file=sys.stderr)
        raise SystemExit(130)
    except (TaskError, CheckpointError, OSError) as err:
        done = f"; {path} holds step {saved['step']}" if 'step' in saved else ''
        raise SystemExit(f"train.py: error: {one_line(err)}{done}")
    finally:
        signal.signal(signal.SIGINT, handler)
        release()


def run(tc, cfg, task, train_difficulty, device, rank, world, saved):
    """Train (or resume) and write the final table; records each checkpoint written in `saved`."""
    master = rank == 0
    torch.manual_seed(tc.seed)
    model = LoopedTransformer(cfg).to(device)
    optimizer = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)                   # the data stream (same on every rank)
    path = os.path.join(tc.out_dir, 'ckpt.pt')
    step = 0
    if tc.resume:
        try:
            ckpt = load_checkpoint(path, device)
            check_resumable(ckpt, cfg, tc, path)
            step = restore(ckpt, model, optimizer, gen, path)
        except CheckpointError as err:
            raise SystemExit(f"train.py: error: cannot resume: {err}")
        saved['step'] = step
        if master:
            print(f"resuming {path} at step {step}")
    elif os.path.exists(path) and not tc.overwrite:
        raise SystemExit(f"train.py: error: {path} already exists; pass --resume to continue it, "
                         f"--overwrite to replace it, or another --out_dir")
    if master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"task {task.name} ({train_difficulty}) | recall {cfg.recall} | inner {cfg.inner_norm} | "
              f"outer_norm {cfg.outer_norm} | d {cfg.d_model} | iters {cfg.n_iters} | {n_params / 1e3:.1f}k params | "
              f"{device} x{world}")

    loss_module = ProgressiveLoss(model, tc.alpha, tc.tbptt, tc.compile, getattr(task, 'loss', token_cross_entropy))
    if tc.compile and device.type == 'cpu' and master:
        print("note: --compile on CPU compiles with the C++ backend; expect a long first step and little gain")
    if master:  # rank 0 builds an uncached training pool alone; the others read it from the cache
        task.train_batch(train_difficulty, 1, torch.Generator())
    if world > 1:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device] if device.type == 'cuda' else None,
            find_unused_parameters=cfg.recall == 'none')
        torch.distributed.barrier()
    ctx = autocast_context(tc, device)
    peak = peak_flops(tc, device)
    local_b = tc.batch_size // world

    def kept():
        return (f"the last good checkpoint (step {saved['step']}) is kept in {path}" if 'step' in saved
                else "no checkpoint was written")

    def save(step):  # every save, the last one too: non-finite weights never replace a good checkpoint
        state = [*model.parameters(), *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
        if not all(torch.isfinite(t).all() for t in state):
            raise SystemExit(f"train.py: error: weights are not finite at step {step}; stopping, {kept()}")
        if master:
            stale = os.path.join(tc.out_dir, 'eval.json')            # it described the checkpoint being replaced
            if tc.overwrite and 'step' not in saved and os.path.exists(stale):
                os.remove(stale)
            save_checkpoint(path, model, optimizer, tc, step, gen)
        saved['step'] = step

    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))  # finish the step, save, exit
    t_log, steps_since_log, first_step = time.time(), 0, step + 1
    while step < tc.max_steps:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group['lr'] = lr
        x, y = task.train_batch(train_difficulty, tc.batch_size, gen)    # the global batch; this rank's shard
        n, k, extra = draw_iters(model.default_iters(x.size(1)), gen, tc.overrun)
        x, y = x[rank * local_b:(rank + 1) * local_b].to(device), y[rank * local_b:(rank + 1) * local_b].to(device)
        model.train()
        with ctx:
            loss, logits, fwd_iters, grad_iters = loss_module(x, y, n, k, gen, extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        shared = torch.tensor([loss.item(), float(bool(interrupted))], device=device)  # ranks agree on both
        if world > 1:
            torch.distributed.all_reduce(shared)
        loss_value, stop = shared[0].item() / world, shared[1].item() > 0
        if not math.isfinite(loss_value):
            raise SystemExit(f"train.py: error: loss is {loss_value} at step {step}; stopping, {kept()}")
        optimizer.step()
        step += 1
        steps_since_log += 1
        if master and (step % tc.log_interval == 0 or step in (first_step, tc.max_steps)):
            dt = (time.time() - t_log) / steps_since_log
            acc = token_scores(logits.detach().float().cpu(), y.cpu())['exact']   # whole sequences, this batch
            flops = tc.batch_size * model.flops_per_iter(x.size(1)) * (fwd_iters + 2 * grad_iters)
            mfu = f"{100 * flops / dt / peak:.1f}%" if peak else '-'
            print(f"step {step:5d} | loss {loss_value:.4f} | acc {100 * acc:5.1f}% | lr {lr:.2e} | "
                  f"{1000 * dt:.1f} ms/step | {tc.batch_size / dt:.0f} ex/s | mfu {mfu}", flush=True)
            t_log, steps_since_log = time.time(), 0
        if master and tc.eval_interval and step % tc.eval_interval == 0 and step < tc.max_steps:
            split = task.eval_set(train_difficulty, min(tc.eval_n, 256), tc.seed + 1)
            score = evaluate(model, task, split, [cfg.n_iters], tc.eval_batch, ctx)[0][cfg.n_iters][task.headline]
            print(f"eval step {step} | {task.headline} {100 * score:.1f}% on {train_difficulty} at {cfg.n_iters} iters")
        if stop or (tc.ckpt_interval and step % tc.ckpt_interval == 0 and step < tc.max_steps):
            save(step)
        if stop:
            if master:
                print(f"interrupted: saved step {step} to {path}; continue with --resume")
            raise SystemExit(130)
    signal.signal(signal.SIGINT, previous_handler)
    save(step)
    if master:
        print(f"saved {path} (step {step})")
        saved['phase'] = 'during the final table (eval.json not written)'
        rows = final_table(model, task, tc, ctx)
        result = {'config': {'model': asdict(cfg), 'train': asdict(tc)}, 'step': step, 'headline': task.headline,
                  'rows': rows}
        write_atomic(os.path.join(tc.out_dir, 'eval.json'), lambda tmp: dump_json(result, tmp))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
