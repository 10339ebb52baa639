"""
The paper's three tasks, each easy to train on and harder to test on:

    prefix_sums  bits x_1..x_L -> y_i = (x_1 + ... + x_i) mod 2; difficulty = length L
    sudoku       81 cells -> the solution; difficulty = a named tier (how much search it needs)
    chess        64 squares -> the first move of a forced mate; difficulty = mate depth N

Every task has the same small shape, which train.py and analyze.py rely on:

    task.model_defaults(diff)      LoopedConfig fields the task sets (vocab, classes, positions ...)
    task.train_difficulty          what training draws from; task.eval_difficulties: what it is tested on
    task.eval_mults                test-time iterations for the final table, as multiples of n_iters
    task.parse_difficulty(s)       a difficulty from its command-line spelling (ValueError if unknown)
    task.train_batch(diff, n, gen) -> x (n, L) long, y (n, L) long; drawn from a torch.Generator
    task.eval_set(diff, n, seed)   -> dict with x, y (and whatever score() needs), fixed by the seed
    task.score(logits, split)      -> dict of accuracies in [0, 1]; task.headline names the main one
Targets use -100 for positions that carry no label (ignored by the loss).
"""

import hashlib
import os

import torch

CACHE_DIR = os.environ.get('LOOPED_CACHE', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data'))


class TaskError(ValueError):
    """Bad task input (unknown task or difficulty, impossible sizes); its message is one line."""


# ----------------------------------------------------------------------------- shared helpers

def token_scores(logits, y, solved=None):
    """Per-token accuracy over labelled positions and whole-sequence (exact) accuracy.
    logits (N, L, C), y (N, L) with -100 unlabelled; `solved` (N,) overrides the exact check."""
    pred = logits.argmax(-1)
    labelled = y != -100
    right = (pred == y) & labelled
    exact = (right | ~labelled).all(dim=1) if solved is None else solved
    return {'token': right.sum().item() / max(labelled.sum().item(), 1), 'exact': exact.float().mean().item()}


def _digest(payload):
    """sha256 of a cache payload (tensors, strings, numbers, nested lists/dicts) in a fixed order."""
    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, torch.Tensor):
            h.update(str((v.dtype, tuple(v.shape))).encode())
            h.update(v.contiguous().numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(str(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f'[{len(v)}'.encode())
            for item in v:
                feed(item)
        else:
            h.update(repr(v).encode())
    feed(payload)
    return h.hexdigest()


def cached(name, version, params, build, cache_dir=None, verbose=True):
    """Return build() through a versioned on-disk cache file. The file records the version, the
    params that produced it, and a checksum of its payload; a file that fails any check (stale,
    corrupt, edited) is rebuilt, never used. Writes are atomic (temp file + rename)."""
    cache_dir = cache_dir or CACHE_DIR
    tag = '_'.join(f'{k}{v}' for k, v in sorted(params.items()))
    path = os.path.join(cache_dir, f'{name}_v{version}_{tag}.pt')
    why = None
    if os.path.exists(path):
        try:
            blob = torch.load(path, weights_only=True)
            if blob.get('version') != version or blob.get('params') != params:
                why = 'stale'
            elif blob.get('sha256') != _digest(blob.get('payload')):
                why = 'checksum mismatch'
            else:
                return blob['payload']
        except Exception as err:
            why = f'unreadable ({type(err).__name__})'
        if verbose:
            print(f"cache {path} is {why}; regenerating")
    payload = build()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save({'version': version, 'params': params, 'sha256': _digest(payload), 'payload': payload}, tmp)
    os.replace(tmp, path)
    return payload


# ----------------------------------------------------------------------------- prefix sums

class PrefixSums:
    """Bits in (token id = bit), prefix parity out (class c at position i = parity of bits 1..i).
    Difficulty is the length. Causal attention with rotary positions, so any length can be fed,
    and the loop runs longer on longer strings (cfg.scale_iters)."""
    name = 'prefix_sums'
    train_difficulty = 32
    eval_difficulties = (32, 64, 128, 256, 512)
    eval_mults = (0.5, 1, 2, 4, 8, 16)      # test-time iterations in the final table, as multiples of n_iters

    def model_defaults(self, length):
        return dict(vocab_size=2, n_classes=2, block_size=length, pos='rope', causal=True, scale_iters=True)
    headline = 'exact'

    def parse_difficulty(self, s):
        try:
            length = int(s)
        except ValueError:
            raise TaskError(f"prefix_sums difficulty is a string length, got {s!r}")
        if not 1 <= length <= 65536:
            raise TaskError(f"prefix_sums length must be in [1, 65536], got {length}")
        return length

    @staticmethod
    def make(bits):  # bits (n, L) long -> x, y
        return bits, torch.cumsum(bits, dim=1) % 2

    def train_batch(self, length, n, gen):
        return self.make(torch.randint(0, 2, (n, length), generator=gen))

    def eval_set(self, length, n, seed):
        gen = torch.Generator().manual_seed(1_000_003 * seed + length)  # disjoint from training streams
        x, y = self.make(torch.randint(0, 2, (n, length), generator=gen))
        return {'x': x, 'y': y}

    def score(self, logits, split):
        return token_scores(logits, split['y'])


# ----------------------------------------------------------------------------- registry

TASKS = {'prefix_sums': PrefixSums}


def get_task(name):
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()
