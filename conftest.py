"""Shared helpers of the test files (pytest, CPU only, a few minutes: `python -m pytest -q`)."""

import math
import os
import subprocess
import sys

import torch

from looped import LoopedConfig, LoopedTransformer
import tasks
import train

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, timeout=300):
    """Run one of the project's scripts in a subprocess; returns CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)


def tiny_config(**kw):
    base = dict(vocab_size=2, n_classes=2, block_size=8, d_model=16, n_head=2, n_iters=3, causal=True)
    return LoopedConfig(**{**base, **kw})


def quick_args(out_dir, *extra):
    return ['--task', 'prefix_sums', '--out_dir', str(out_dir), '--d_model', '16', '--n_head', '2', '--n_iters', '3',
            '--batch_size', '8', '--train_difficulty', '8', '--eval_n', '8', '--eval_difficulties', '8,16',
            '--eval_mults', '1', '--log_interval', '1', '--eval_interval', '0', '--warmup_steps', '2', *extra]


def save_tiny_checkpoint(path, poison=False, **kw):
    tc = train.TrainConfig(task='prefix_sums', train_difficulty='8')
    torch.manual_seed(0)
    model = LoopedTransformer(tiny_config(**{**tasks.PrefixSums().model_defaults(8), **kw}))
    if poison:                                                  # a diverged loop: the state turns NaN
        model.recall_proj.weight.data.fill_(math.nan)
    train.save_checkpoint(path, model, train.make_optimizer(model, tc), tc, 0, torch.Generator())
