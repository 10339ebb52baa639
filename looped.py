"""
A looped (weight-tied) transformer, after "Stability and Generalization in Looped Transformers"
(Labovich, arXiv 2604.15259). One transformer block B is applied again and again to a state h:

    e   = embed(x)                                   input embedding            (B, T, d)
    h_0 = e | 0 | noise                              initial state              (B, T, d)
    h_{t+1} = N_out( B(h_t, e) )                     one iteration F(h_t, e)    (B, T, d)
    logits  = head( LN(h_t) )                        readout after any t        (B, T, n_classes)
              or q_i . k_j / sqrt(d), (q, k) = head(LN(h_t))   with pair_head   (B, T, T)

Recall (how the input re-enters the loop):
    none      B(h, e) = Block(h)                     input only in h_0: the map h -> F(h) is the same
                                                     for every input (the paper's negative result)
    standard  B(h, e) = Block(W [h ; e])             inject at the block's entrance (Bansal et al. 2022)
    internal  B(h, e) = Block(h) with its MLP        inject inside the block, between attention and MLP:
                        reading [LN(h) ; e]          attention sees the state, the MLP state and input
Outer normalization N_out is a LayerNorm of the loop state after every iteration, outside the
block's residual stream; recall + outer normalization is the paper's stable regime.
"""

import math
import numbers
import re
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

RECALLS = ('none', 'standard', 'internal')
INNER_NORMS = ('pre', 'post', 'none')
INIT_STATES = ('embed', 'zeros', 'noise')
POSITIONS = ('rope', 'learned', 'none')
GRAPHS = {'all': None, 'sudoku': 81, 'chess': 64, 'chess_local': 64}   # attention graph -> the token count it is drawn for
MAX_ITERS = 100_000      # loop iterations in one call: more is a typo, not a plan (hours of silence)
TYPE_WORDS = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}


def check_fields(cfg):
    """Check every field of a config dataclass: it has its default's type, floats are finite, and it
    lies in cfg.BOUNDS[name], an interval like '[0, 1)' or '(0, inf)' ('2**k' allowed). Raises
    ValueError with a one-line message saying what is allowed. Shared by every script's config."""
    num = lambda s: 2 ** int(s[3:]) if s.startswith('2**') else int(s) if re.fullmatch(r'-?\d+', s) else float(s)
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), type(f.default)
        if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                or kind is float and type(value) is int):
            raise ValueError(f"{f.name} must be {TYPE_WORDS[kind]}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")
        if f.name not in cfg.BOUNDS:
            continue
        left, lo, hi, right = re.fullmatch(r'([\[(])(.+), (.+)([\])])', cfg.BOUNDS[f.name]).groups()
        lo, hi = num(lo), num(hi)
        if value < lo or value > hi or (left == '(' and value == lo) or (right == ')' and value == hi):
            allowed = f"{'>' if left == '(' else '>='} {lo}" if hi == math.inf else f"in {cfg.BOUNDS[f.name].replace('**', '^')}"
            raise ValueError(f"{f.name} must be {allowed}, got {value}")


def pick_device(name):
    """torch.device for auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps, or a ValueError
    saying why it cannot be used here."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if not re.fullmatch(r'cpu|mps|cuda(:\d+)?', name):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"device {name} asked for, but no CUDA device is available")
    if name.startswith('cuda:') and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"device {name} asked for, but there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if name == 'mps' and not torch.backends.mps.is_available():
        raise ValueError("device mps asked for, but MPS is not available")
    return torch.device(name)


@dataclass
class LoopedConfig:
    vocab_size: int = 2          # input token ids are 0..vocab_size-1
    n_classes: int = 2           # output classes per token (unused with pair_head)
    pair_head: bool = False      # score token pairs instead: logits[i, j] = q_i . k_j / sqrt(d), (B, T, T) (chess: from i to j)
    block_size: int = 32         # training length; 'learned' positions cap inputs at this length
    d_model: int = 64            # width of the loop state
    n_head: int = 4              # attention heads
    mlp_ratio: int = 4           # MLP hidden width = mlp_ratio * d_model
    n_iters: int = 16            # loop iterations, training and test (with scale_iters: per block_size tokens)
    scale_iters: bool = False    # iterations proportional to length: ceil(n_iters * T / block_size)
    recall: str = 'standard'     # none | standard | internal
    inner_norm: str = 'pre'      # pre: x + f(LN(x)) | post: LN(x + f(x)) | none: x + f(x)
    outer_norm: bool = True      # LayerNorm of the state after every iteration
    init_state: str = 'embed'    # h_0: embed (h_0 = e) | zeros | noise (unit Gaussian)
    pos: str = 'rope'            # rope: rotary (any length) | learned: absolute, up to block_size | none
    causal: bool = False         # causal attention mask
    window: int = 0              # attend only to positions less than `window` away (0: all)
    graph: str = 'all'           # who may attend to whom: all | sudoku (row/column/box peers) | chess | chess_local (see graph_mask)
    board_bias: bool = False     # a learned attention bias per head for each (row, column) offset on the graph's board
    bos: bool = False            # prepend a start token (id vocab_size) inside the model; its output is dropped
    bias: bool = False           # biases in Linear layers
    halt_tol: float = 0.0        # default rule: > 0 = after n_iters, go on per example until ||h_t+1 - h_t|| / ||h_t|| < halt_tol
    max_iters: int = 0           # cap of the halting rule (0: 8 x n_iters)

    BOUNDS = dict(vocab_size='[2, 2**20]', n_classes='[2, 2**20]', block_size='[1, 2**20]', d_model='[1, 8192]',
                  n_head='[1, 8192]', mlp_ratio='[1, 64]', n_iters=f'[1, {MAX_ITERS}]', window='[0, inf)',
                  halt_tol='[0, inf)', max_iters=f'[0, {MAX_ITERS}]')   # allowed values (check_fields)

    def validate(self):
        """Raise ValueError with a one-line message if the configuration is impossible."""
        check_fields(self)
        for name, value, allowed in (('recall', self.recall, RECALLS), ('inner_norm', self.inner_norm, INNER_NORMS),
                                     ('init_state', self.init_state, INIT_STATES), ('pos', self.pos, POSITIONS),
                                     ('graph', self.graph, tuple(GRAPHS))):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.pos == 'rope' and (self.d_model // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, got d_model/n_head={self.d_model // self.n_head}")
        if self.recall == 'none' and self.init_state != 'embed':  # h_0 is then the only way in, and it ignores x
            raise ValueError(f"recall 'none' with init_state {self.init_state!r} never reads the input; use init_state 'embed' or a recall")
        if self.board_bias and not GRAPHS[self.graph]:
            raise ValueError(f"board_bias needs a board: use it with graph {' or '.join(repr(g) for g, n in GRAPHS.items() if n)}")
        if GRAPHS[self.graph] and self.pos == 'learned' and self.block_size != GRAPHS[self.graph]:
            raise ValueError(f"graph {self.graph!r} is drawn for {GRAPHS[self.graph]} tokens, but block_size is {self.block_size}")
        return self

    def default_iters(self, T):  # the model's rule for length T (LoopedTransformer.default_iters), before any model is built
        return math.ceil(self.n_iters * T / self.block_size) if self.scale_iters else self.n_iters


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021): rotates q, k by angles proportional to position,
    so attention scores depend on relative offsets only and any length can be fed."""

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        self.register_buffer('inv_freq', base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)
        self.cache = None  # (T, device, dtype, cos, sin): the loop calls us with the same T every iteration

    def forward(self, x):  # x: (..., T, hd)
        T = x.size(-2)
        if self.cache is None or self.cache[:3] != (T, x.device, x.dtype):
            angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), self.inv_freq)  # (T, hd/2)
            angles = torch.cat((angles, angles), dim=-1)                                                  # (T, hd)
            self.cache = (T, x.device, x.dtype, angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        cos, sin = self.cache[3:]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin     # rotate pairs (x1_j, x2_j) by angle_j


def window_mask(T, window, causal, device=None):
    """Boolean (T, T), True where query i may attend to key j: |i - j| < window, and j <= i if causal."""
    offset = torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]  # i - j
    allowed = offset.abs() < window
    return allowed & (offset >= 0) if causal else allowed


def graph_mask(graph, T, device=None):
    """Boolean (T, T), True where token i may attend to token j under the task's structure, the
    attention analogue of a convolution's kernel shape: one iteration is a local rule, and repeating
    it carries information as far as the input needs.
      sudoku: cell i = 9 r + c attends to its 20 peers (same row, column or 3x3 box) and itself;
      chess:  square i = 8 rank + file attends to the squares on its rank, file and diagonals
              (the lines along which pieces move and attack) and a knight's jump away;
      chess_local: only its 8 neighbours, itself and a knight's jump away, like the 3x3 kernels of
              a convolutional chess solver: a slider's attack crosses the board one square per
              iteration and stops at the first piece in its way."""
    if GRAPHS[graph] != T:
        raise ValueError(f"attention graph {graph!r} is drawn for {GRAPHS[graph]} tokens, got an input of {T}")
    i = torch.arange(T, device=device)
    if graph == 'sudoku':
        r, c = i // 9, i % 9
        box = r // 3 * 3 + c // 3
        return (r[:, None] == r) | (c[:, None] == c) | (box[:, None] == box)
    dr, df = ((i // 8)[:, None] - i // 8).abs(), ((i % 8)[:, None] - i % 8).abs()    # rank and file distances
    knight = dr * df == 2
    if graph == 'chess_local':
        return ((dr <= 1) & (df <= 1)) | knight
    return (dr == 0) | (df == 0) | (dr == df) | knight


def board_offsets(graph):
    """(T, T) long: the index of the (row, column) offset from square i to square j on the graph's board,
    (dr + side - 1) * (2 side - 1) + (dc + side - 1), into a table of (2 side - 1)^2 offsets."""
    side = math.isqrt(GRAPHS[graph])
    r, c = torch.arange(side * side) // side, torch.arange(side * side) % side
    return (r[None, :] - r[:, None] + side - 1) * (2 * side - 1) + (c[None, :] - c[:, None] + side - 1)


def local_attention(q, k, v, window, causal):
    """softmax(q k^T / sqrt(hd)) v restricted to |i - j| < window (and j <= i if causal), computed
    from each query's few neighbours in O(T * window) instead of the O(T^2) of a masked dense
    product. q, k, v: (B, H, T, hd). Equals sdpa with window_mask (tested)."""
    T, pad = q.size(2), window - 1
    offsets = torch.arange(0 if causal else -pad, window, device=q.device)     # i - j, (W,)
    kp, vp = (F.pad(t, (0, 0, pad, pad)) for t in (k, v))                       # (B, H, T + 2 pad, hd)
    ks = torch.stack([kp[:, :, pad - o:pad - o + T] for o in offsets.tolist()], 3)  # (B, H, T, W, hd)
    vs = torch.stack([vp[:, :, pad - o:pad - o + T] for o in offsets.tolist()], 3)
    scores = torch.einsum('bhtd,bhtwd->bhtw', q, ks) * q.size(-1) ** -0.5      # (B, H, T, W)
    j = torch.arange(T, device=q.device)[:, None] - offsets                     # key index, (T, W)
    scores = scores.masked_fill((j < 0) | (j >= T), float('-inf'))             # padding is not a key
    return torch.einsum('bhtw,bhtwd->bhtd', scores.softmax(-1), vs)            # (B, H, T, hd)


class SelfAttention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.causal, self.window, self.graph, self.bos = cfg.n_head, cfg.causal, cfg.window, cfg.graph, cfg.bos
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.rotary = Rotary(cfg.d_model // cfg.n_head) if cfg.pos == 'rope' else None
        self.mask_cache = None
        if cfg.board_bias:   # like a convolution's kernel, per head: how much a square attends to the one (dr, dc) away
            self.register_buffer('offsets', board_offsets(cfg.graph), persistent=False)
            self.board_bias = nn.Parameter(torch.zeros(cfg.n_head, int(self.offsets.max()) + 1))   # (H, (2 side - 1)^2)
        else:
            self.board_bias = None

    def forward(self, x):  # x: (B, T, d)
        B, T, d = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        q, k, v = (*self.rotary(qkv[:2]), qkv[2]) if self.rotary is not None else qkv  # (B, H, T, hd) each
        if self.window and self.graph == 'all' and T > 64 * self.window:  # long inputs, narrow band: gather neighbours
            y = local_attention(q, k, v, self.window, self.causal)
        elif self.window or self.graph != 'all':
            if self.mask_cache is None or self.mask_cache.shape[0] != T or self.mask_cache.device != x.device:
                self.mask_cache = self.mask(T, x.device)
            mask = self.mask_cache if self.board_bias is None else self.biased(self.mask_cache)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))  # (B, T, d)

    def mask(self, T, device):
        """(T, T) bool: the band (window, causal) and the graph together; a start token sees and is seen by all."""
        allowed = window_mask(T, self.window, self.causal, device) if self.window else torch.ones(T, T, dtype=torch.bool, device=device)
        if self.graph != 'all':
            allowed[self.bos:, self.bos:] &= graph_mask(self.graph, T - self.bos, device)
        return allowed

    def biased(self, allowed):
        """(1, H, T, T) additive scores: each head's learned bias for the pair's board offset, -inf where not allowed
        (4-d: the mask shape sdpa's fused CPU kernel takes where no gradient is needed)."""
        bias = F.pad(self.board_bias[:, self.offsets], (int(self.bos), 0, int(self.bos), 0))   # a start token: bias 0
        return bias.masked_fill(~allowed, float('-inf'))[None]


class MLP(nn.Module):

    def __init__(self, cfg, d_in):
        super().__init__()
        self.fc = nn.Linear(d_in, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Attention then MLP, each with a residual connection and the chosen inner normalization.
    With internal recall the MLP reads [state ; input embedding] (width 2d)."""

    def __init__(self, cfg):
        super().__init__()
        self.inner_norm, self.internal = cfg.inner_norm, cfg.recall == 'internal'
        self.attn = SelfAttention(cfg)
        self.mlp = MLP(cfg, 2 * cfg.d_model if self.internal else cfg.d_model)
        norm = (lambda: nn.Identity()) if cfg.inner_norm == 'none' else (lambda: nn.LayerNorm(cfg.d_model, bias=cfg.bias))
        self.ln1, self.ln2 = norm(), norm()

    def forward(self, h, e):  # h, e: (B, T, d)
        if self.inner_norm == 'post':                                  # LN(x + f(x))
            h = self.ln1(h + self.attn(h))
            return self.ln2(h + self.mlp(torch.cat((h, e), -1) if self.internal else h))
        h = h + self.attn(self.ln1(h))                                 # x + f(LN(x)); ln = identity for 'none'
        u = self.ln2(h)
        return h + self.mlp(torch.cat((u, e), -1) if self.internal else u)


class LoopedTransformer(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg.validate()
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size + cfg.bos, d)
        self.pos_emb = nn.Embedding(cfg.block_size + cfg.bos, d) if cfg.pos == 'learned' else None
        self.recall_proj = nn.Linear(2 * d, d, bias=cfg.bias) if cfg.recall == 'standard' else None  # W in W [h ; e]
        self.block = Block(cfg)
        self.ln_out = nn.LayerNorm(d, bias=cfg.bias) if cfg.outer_norm else nn.Identity()  # N_out
        self.ln_f = nn.LayerNorm(d, bias=cfg.bias)
        self.head = nn.Linear(d, 2 * d if cfg.pair_head else cfg.n_classes, bias=cfg.bias)
        self.apply(self._init_weights)
        if self.recall_proj is not None:   # start W [h ; e] near h: the loop first carries its state forward
            with torch.no_grad():
                self.recall_proj.weight[:, :d] += torch.eye(d)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # --- the pieces of the loop; analyze.py differentiates through step() ---

    def embed(self, idx):  # idx: (B, T) -> e: (B, T + bos, d)
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            kind = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise TypeError(f"the model takes a LongTensor (B, T) of token ids, got {kind}")
        if idx.dim() != 2:
            raise ValueError(f"the model takes token ids of shape (B, T), got shape {tuple(idx.shape)}")
        idx, T = idx.long(), idx.size(1)
        if self.pos_emb is not None and T > self.cfg.block_size:
            raise ValueError(f"input length {T} exceeds block_size {self.cfg.block_size} of learned positions")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{idx.min()}, {idx.max()}]")
        if self.cfg.bos:  # the start token: a left boundary, and an attention sink
            idx = torch.cat((torch.full_like(idx[:, :1], self.cfg.vocab_size), idx), dim=1)
            T += 1
        e = self.tok_emb(idx)
        if self.pos_emb is not None:
            e = e + self.pos_emb(torch.arange(T, device=idx.device))
        return e

    def initial_state(self, e, generator=None):  # h_0: (B, T, d)
        if self.cfg.init_state == 'embed':
            return e
        if self.cfg.init_state == 'zeros':
            return torch.zeros_like(e)
        noise = torch.randn(e.shape, generator=generator, device=generator.device if generator else e.device)
        return noise.to(device=e.device, dtype=e.dtype)

    def step(self, h, e):
        """One iteration h_{t+1} = F(h_t, e) = N_out(B(h_t, e)). Shapes (B, T, d)."""
        if self.cfg.recall == 'standard':
            h = self.recall_proj(torch.cat((h, e), -1))              # W [h ; e]
        return self.ln_out(self.block(h, e))

    def readout(self, h):  # (B, T + bos, d) -> logits (B, T, n_classes), or (B, T, T) with pair_head
        out = self.head(self.ln_f(h[:, 1:] if self.cfg.bos else h))
        if not self.cfg.pair_head:
            return out
        q, k = out.chunk(2, dim=-1)                                   # (B, T, d) each
        return q @ k.transpose(1, 2) * q.size(-1) ** -0.5             # (B, T, T)

    def default_iters(self, T):
        """The fixed part of the iteration rule (never looks at labels; training and test alike):
        n_iters, or with cfg.scale_iters a fixed number per token, ceil(n_iters * T / block_size),
        shorter and longer inputs alike. With cfg.halt_tol the rule goes on from here (see run)."""
        return self.cfg.default_iters(T)

    def max_iters(self, T):
        """The cap of the halting rule: cfg.max_iters, or 8 x default_iters(T)."""
        return self.cfg.max_iters or 8 * self.default_iters(T)

    def forward(self, idx, n_iters=None):
        """idx: LongTensor (B, T). Runs exactly n_iters iterations, or the default rule if None,
        and returns logits (B, T, n_classes)."""
        return self.run(idx, n_iters)[0]

    def run(self, idx, n_iters=None):
        """Returns logits (B, T, n_classes) and the iterations each example ran (B,). The default rule
        (n_iters None): default_iters(T) iterations; with cfg.halt_tol > 0 each example then goes on
        until its state stops moving, ||h_{t+1} - h_t|| / ||h_t|| < halt_tol, or max_iters(T) is
        reached. Inputs whose size says nothing of their difficulty (sudoku) get the iterations
        they need this way; labels are never read."""
        if n_iters is not None and (not isinstance(n_iters, numbers.Integral) or isinstance(n_iters, bool) or not 0 <= n_iters <= MAX_ITERS):
            raise ValueError(f"n_iters must be None (the default rule) or an integer in [0, {MAX_ITERS}], got {n_iters!r}")
        e = self.embed(idx)
        h = self.initial_state(e)
        fixed = self.default_iters(idx.size(1)) if n_iters is None else n_iters
        for _ in range(fixed):
            h = self.step(h, e)
        used = torch.full((idx.size(0),), fixed, dtype=torch.long, device=idx.device)
        if n_iters is None and self.cfg.halt_tol > 0:
            active = torch.arange(idx.size(0), device=idx.device)          # examples still moving
            for _ in range(fixed, self.max_iters(idx.size(1))):
                if not len(active):
                    break
                old = h[active]
                new = self.step(old, e[active])
                h = h.index_copy(0, active, new)
                used[active] += 1
                moved = (new - old).flatten(1).norm(dim=1) / old.flatten(1).norm(dim=1)    # relative residual (n_active,)
                active = active[moved >= self.cfg.halt_tol]
        return self.readout(h), used

    def flops_per_iter(self, T):
        """Forward FLOPs of one iteration for one sequence of length T (2 * multiply-adds)."""
        cfg, d = self.cfg, self.cfg.d_model
        matmul = 3 * d * d + d * d + 2 * (2 if cfg.recall == 'internal' else 1) * d * cfg.mlp_ratio * d
        matmul += 2 * d * d if cfg.recall == 'standard' else 0
        T = T + cfg.bos
        keys = min(T, cfg.window) if cfg.window else T
        attn = 2 * keys * d  # scores + weighted sum, per query
        return 2 * T * (matmul + attn)

    # --- checkpoints ---

    @classmethod
    def from_checkpoint(cls, path, map_location='cpu'):
        """Load a checkpoint written by train.py; CPU, eval mode. Raises CheckpointError with a
        one-line message for a missing, corrupt or incompatible file."""
        ckpt = load_checkpoint(path, map_location)
        model = cls(config_from_dict(ckpt['config']['model'], path))
        load_weights(model, ckpt['model'], path)
        return model.eval()


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or does not fit the model asked for."""


def one_line(err):
    """An exception as one whole line for a user: its first line (else its type's name), and of a long
    line its first sentence; never cut mid-word."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else type(err).__name__
    if len(text) > 160 and '. ' in text[:160]:
        text = text[:text.index('. ') + 1]
    return text


def load_checkpoint(path, map_location='cpu'):
    """torch.load with weights_only=True, turning every failure into a one-line CheckpointError."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}")
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a checkpoint (try {path}/ckpt.pt)")
    except EOFError:
        raise CheckpointError(f"{path} is empty or cut short, not a readable checkpoint")
    except Exception as err:  # truncated zip, pickle garbage, wrong file type, no permission ...
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {one_line(err)})")
    config = ckpt.get('config') if isinstance(ckpt, dict) else None
    if (not isinstance(config, dict) or not isinstance(config.get('model'), dict) or not isinstance(config.get('train', {}), dict)
            or not isinstance(ckpt.get('model'), dict)):
        raise CheckpointError(f"{path} is not a looped checkpoint (missing model weights or config)")
    return ckpt


def load_weights(model, state, path):
    """model.load_state_dict(state), a CheckpointError if the weights do not fit the model's config."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        lines = str(err).strip().splitlines()          # torch: a heading, then one line per problem
        detail = lines[1].strip().rstrip('.') if len(lines) > 1 else one_line(err)
        raise CheckpointError(f"{path}: weights do not match the stored config ({detail})")


def config_from_dict(d, source='checkpoint'):
    known = {f.name for f in fields(LoopedConfig)}
    unknown = set(d) - known
    if unknown:
        raise CheckpointError(f"{source}: unknown model config keys {sorted(unknown)}")
    try:
        return LoopedConfig(**d).validate()
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: bad model config: {one_line(err)}")


def config_to_dict(cfg):
    return asdict(cfg)
