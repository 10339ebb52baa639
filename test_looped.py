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
