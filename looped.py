"""
A looped (weight-tied) transformer, after "Stability and Generalization in Looped Transformers"
(Labovich, arXiv 2604.15259). One transformer block B is applied again and again to a state h:

    e   = embed(x)                                   input embedding            (B, T, d)
    h_0 = e | 0 | noise                              initial state              (B, T, d)
    h_{t+1} = N_out( B(h_t, e) )                     one iteration F(h_t, e)    (B, T, d)
    logits  = head( LN(h_t) )                        readout after any t        (B, T, n_classes)
              or q_i . k_j / sqrt(d), (q, k) = head(LN(h_t))   with pair_head   (B, T, T)

Recall (how the input re-enters the loop):
    none           B(h, e) = Block(h)               input only in h_0: the map h -> F(h) is the same for
                                                    every input (the paper's negative result)
    standard       B(h, e) = Block(W [h ; e])       inject at the block's entrance (Bansal et al. 2022)
    internal       the MLP reads [LN(h) ; e]        inject inside the block, between attention and MLP
    internal_both  each branch reads LN(W [h ; e])  inject into both branches; with N_out the state is
                                                    normalized after each of the two updates (Def. 5.2 of
                                                    the paper's v2, as a public implementation reads it)
Outer normalization N_out is a LayerNorm of the loop state after every iteration, outside the
block's residual stream; recall + outer normalization is the paper's stable regime.
"""

import math
import numbers
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

RECALLS = ('none', 'standard', 'internal', 'internal_both')
INNER_NORMS = ('pre', 'post', 'none')
INIT_STATES = ('embed', 'zeros', 'noise')
POSITIONS = ('rope', 'learned', 'none')
GRAPHS = {'all': None, 'sudoku': 81, 'chess': 64, 'chess_local': 64}   # attention graph -> its token count
ITER_LIMIT = 100_000      # the most loop iterations one call may run


# ----------------------------------------------------------------------------- checks shared by every config

def check_types(cfg):
    """Every field of a config dataclass has its default's type (an int passes for a float); floats are finite."""
    words = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), type(f.default)
        ok = type(value) is kind or (kind is float and type(value) is int)
        if not ok:
            raise ValueError(f"{f.name} must be {words[kind]}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


def check_range(cfg, name, lo, hi=math.inf, open_lo=False, open_hi=False):
    """cfg.name lies in the interval from lo to hi (closed unless open_lo / open_hi), else a one-line ValueError."""
    value = getattr(cfg, name)
    if value < lo or value > hi or (open_lo and value == lo) or (open_hi and value == hi):
        top = f"2^{hi.bit_length() - 1}" if isinstance(hi, int) and hi > 8192 and not hi & (hi - 1) else hi
        where = (f"{'>' if open_lo else '>='} {lo}" if hi == math.inf else
                 f"in {'(' if open_lo else '['}{lo}, {top}{')' if open_hi else ']'}")
        raise ValueError(f"{name} must be {where}, got {value}")


def check_iters(n):
    """n loop iterations can be asked for: an integer in [0, ITER_LIMIT], else a one-line ValueError."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 0 <= n <= ITER_LIMIT:
        raise ValueError(f"n_iters must be None (the default rule) or an integer in [0, {ITER_LIMIT}], got {n!r}")


def check_choice(cfg, name, allowed):
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; choose one of {', '.join(allowed)}")


@dataclass
class LoopedConfig:
    vocab_size: int = 2          # input token ids are 0..vocab_size-1
    n_classes: int = 2           # output classes per token (unused with pair_head)
    pair_head: bool = False      # score token pairs instead: logits[i, j] = q_i . k_j / sqrt(d), (B, T, T)
    block_size: int = 32         # training length; 'learned' positions cap inputs at this length
    d_model: int = 64            # width of the loop state
    n_head: int = 4              # attention heads
    mlp_ratio: int = 4           # MLP hidden width = mlp_ratio * d_model
    n_iters: int = 16            # loop iterations, training and test (with scale_iters: per block_size tokens)
    scale_iters: bool = False    # iterations proportional to length: ceil(n_iters * T / block_size)
    recall: str = 'standard'     # none | standard | internal | internal_both
    inner_norm: str = 'pre'      # pre: x + f(LN(x)) | post: LN(x + f(x)) | none: x + f(x)
    outer_norm: bool = True      # LayerNorm of the state after every iteration
    init_state: str = 'embed'    # h_0: embed (h_0 = e) | zeros | noise (unit Gaussian)
    pos: str = 'rope'            # rope: rotary (any length) | learned: absolute, up to block_size | none
    causal: bool = False         # causal attention mask
    window: int = 0              # attend only to positions less than `window` away (0: all)
    graph: str = 'all'           # who attends to whom: all | sudoku | chess | chess_local (see graph_mask)
    board_bias: bool = False     # a learned attention bias per head for each (row, column) offset on the board
    bos: bool = False            # prepend a start token (id vocab_size) inside the model; its output is dropped
    bias: bool = False           # biases in Linear layers
    halt_tol: float = 0.0        # > 0: after n_iters, each example goes on until its residual is below this
    max_iters: int = 0           # cap of the halting rule (0: 8 x n_iters)

    def validate(self):
        """Raise ValueError with a one-line message if the configuration is impossible; returns self."""
        check_types(self)
        for name, allowed in (('recall', RECALLS), ('inner_norm', INNER_NORMS), ('init_state', INIT_STATES),
                              ('pos', POSITIONS), ('graph', tuple(GRAPHS))):
            check_choice(self, name, allowed)
        for name, lo, hi in (('vocab_size', 2, 2**20), ('n_classes', 2, 2**20), ('block_size', 1, 2**20),
                             ('d_model', 1, 8192), ('n_head', 1, 8192), ('mlp_ratio', 1, 64),
                             ('n_iters', 1, ITER_LIMIT), ('window', 0, math.inf), ('halt_tol', 0, math.inf),
                             ('max_iters', 0, ITER_LIMIT)):
            check_range(self, name, lo, hi)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.pos == 'rope' and (self.d_model // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, got d_model/n_head={self.d_model // self.n_head}")
        if self.recall == 'none' and self.init_state != 'embed':
            raise ValueError(f"recall 'none' with init_state {self.init_state!r} never reads the input; "
                             f"use init_state 'embed' or a recall")
        boards = ' or '.join(repr(g) for g, n in GRAPHS.items() if n)
        if self.board_bias and not GRAPHS[self.graph]:
            raise ValueError(f"board_bias needs a board: use it with graph {boards}")
        if GRAPHS[self.graph] and self.pos == 'learned' and self.block_size != GRAPHS[self.graph]:
            raise ValueError(f"graph {self.graph!r} is drawn for {GRAPHS[self.graph]} tokens, "
                             f"but block_size is {self.block_size}")
        return self

    def check_input(self, T):
        """Raise ValueError if an input of T tokens cannot be fed (learned positions, the attention graph)."""
        if self.pos == 'learned' and T > self.block_size:
            raise ValueError(f"input length {T} exceeds block_size {self.block_size} of learned positions; "
                             f"use pos 'rope' or a larger block_size")
        if GRAPHS[self.graph] not in (None, T):
            raise ValueError(f"attention graph {self.graph!r} is drawn for {GRAPHS[self.graph]} tokens, "
                             f"got an input of {T}")

    def default_iters(self, T):
        """The iterations of the default rule for an input of T tokens (before any halting)."""
        return math.ceil(self.n_iters * T / self.block_size) if self.scale_iters else self.n_iters

    def cap_iters(self, T):
        """The cap of the halting rule: max_iters, or 8 x default_iters(T)."""
        return self.max_iters or 8 * self.default_iters(T)


# ----------------------------------------------------------------------------- attention

class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021): rotates q, k by angles proportional to position."""

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        self.register_buffer('inv_freq', base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)
        self.cache = None  # (T, device, dtype, cos, sin)

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
    """Boolean (T, T), True where token i may attend to token j under the task's structure:
      sudoku:      cell i = 9 r + c attends to its 20 peers (same row, column or 3x3 box) and itself;
      chess:       square i = 8 rank + file attends to its rank, file, diagonals and knight jumps;
      chess_local: its 8 neighbours, itself and its knight jumps (a 3x3 kernel plus the knight)."""
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
    """(T, T) long: the index (dr + side - 1) * (2 side - 1) + (dc + side - 1) of the (row, column) offset from
    square i to square j, into a table of (2 side - 1)^2 offsets."""
    side = math.isqrt(GRAPHS[graph])
    r, c = torch.arange(side * side) // side, torch.arange(side * side) % side
    return (r[None, :] - r[:, None] + side - 1) * (2 * side - 1) + (c[None, :] - c[:, None] + side - 1)


def local_attention(q, k, v, window, causal):
    """softmax(q k^T / sqrt(hd)) v restricted to |i - j| < window (and j <= i if causal), from each query's
    few neighbours in O(T window). q, k, v: (B, H, T, hd) -> (B, H, T, hd); equals sdpa with window_mask."""
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
        self.n_head, self.causal, self.window = cfg.n_head, cfg.causal, cfg.window
        self.graph, self.bos = cfg.graph, cfg.bos
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.rotary = Rotary(cfg.d_model // cfg.n_head) if cfg.pos == 'rope' else None
        self.mask_cache = None
        self.board_bias = None
        if cfg.board_bias:   # per head: how much a square attends to the one (dr, dc) away
            self.register_buffer('offsets', board_offsets(cfg.graph), persistent=False)
            self.board_bias = nn.Parameter(torch.zeros(cfg.n_head, int(self.offsets.max()) + 1))   # (H, offsets)

    def forward(self, x):  # x: (B, T, d)
        B, T, d = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        q, k, v = (*self.rotary(qkv[:2]), qkv[2]) if self.rotary is not None else qkv  # (B, H, T, hd) each
        if self.window and self.graph == 'all' and T > 64 * self.window:    # long inputs, narrow band
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
        allowed = torch.ones(T, T, dtype=torch.bool, device=device)
        if self.window:
            allowed = window_mask(T, self.window, self.causal, device)
        if self.graph != 'all':
            allowed[self.bos:, self.bos:] &= graph_mask(self.graph, T - self.bos, device)
        return allowed

    def biased(self, allowed):
        """(1, H, T, T) additive scores: each head's bias for the pair's board offset, -inf where not allowed."""
        bias = F.pad(self.board_bias[:, self.offsets], (int(self.bos), 0, int(self.bos), 0))   # a start token: 0
        return bias.masked_fill(~allowed, float('-inf'))[None]


# ----------------------------------------------------------------------------- the block

class MLP(nn.Module):

    def __init__(self, cfg, d_in):
        super().__init__()
        self.fc = nn.Linear(d_in, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Attention then MLP, each a residual branch with the chosen inner normalization. What a branch reads:
    LN(h); with recall internal the MLP reads [LN(h) ; e] (width 2d); with internal_both each branch reads
    LN(W [h ; e]), and with outer_norm the state is normalized between the two updates too (ln_mid)."""

    def __init__(self, cfg):
        super().__init__()
        d, both = cfg.d_model, cfg.recall == 'internal_both'
        self.post, self.mlp_reads_e = cfg.inner_norm == 'post', cfg.recall == 'internal'
        self.attn = SelfAttention(cfg)
        self.mlp = MLP(cfg, 2 * d if self.mlp_reads_e else d)
        norm = (lambda: nn.Identity()) if cfg.inner_norm == 'none' else (lambda: nn.LayerNorm(d, bias=cfg.bias))
        self.ln1, self.ln2 = norm(), norm()
        self.mix1 = nn.Linear(2 * d, d, bias=cfg.bias) if both else None   # W_attn in W [h ; e]
        self.mix2 = nn.Linear(2 * d, d, bias=cfg.bias) if both else None   # W_mlp
        self.ln_mid = nn.LayerNorm(d, bias=cfg.bias) if both and cfg.outer_norm else nn.Identity()

    def read(self, h, e, ln, mix, with_e=False):
        """A branch's input (B, T, d or 2d): LN(h), [LN(h) ; e], or LN(W [h ; e]); no LN with post norm."""
        ln = nn.Identity() if self.post else ln
        if mix is not None:
            return ln(mix(torch.cat((h, e), -1)))
        return torch.cat((ln(h), e), -1) if with_e else ln(h)

    def forward(self, h, e):  # h, e: (B, T, d) -> (B, T, d)
        h = h + self.attn(self.read(h, e, self.ln1, self.mix1))
        h = self.ln_mid(self.ln1(h) if self.post else h)                     # post: LN(x + f(x))
        h = h + self.mlp(self.read(h, e, self.ln2, self.mix2, self.mlp_reads_e))
        return self.ln2(h) if self.post else h


# ----------------------------------------------------------------------------- the loop

def iterate(step, h, e, n_iters, halt_tol=0.0, min_iters=0, proj=None):
    """The loop h_{t+1} = step(h_t, e), up to n_iters times; every caller runs it through here. Yields after
    each iteration the state h (B, T, d), each example's residual ||P(h_{t+1} - h_t)|| / ||P h_t|| (B,), in
    float64 but on MPS (P = proj, else the identity), and the iterations each example has run (B,). The residual and
    counts are updated in place: clone them to keep them. With halt_tol > 0, an example stops once it has run
    min_iters and its residual is below halt_tol or NaN; it keeps its state while the others go on, and
    the loop ends when all have stopped."""
    P = proj or (lambda v: v)
    B, wide = h.size(0), torch.float32 if h.device.type == 'mps' else torch.float64     # MPS has no float64
    residual = torch.full((B,), math.inf, dtype=wide, device=h.device)
    used = torch.zeros(B, dtype=torch.long, device=h.device)
    active = torch.arange(B, device=h.device)                     # the examples still iterating
    for t in range(n_iters):
        every = len(active) == B
        old = h if every else h[active]
        new = step(old, e if every else e[active])
        with torch.no_grad():
            moved = P(new - old).to(wide).flatten(1).norm(dim=1)
            residual[active] = moved / P(old).to(wide).flatten(1).norm(dim=1)
        h = new if every else h.index_copy(0, active, new)
        used[active] += 1
        yield h, residual, used
        if halt_tol > 0 and t + 1 >= min_iters:
            active = active[residual[active] >= halt_tol]              # NaN compares False: it stops too
            if not len(active):
                return


class LoopedTransformer(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        if not isinstance(cfg, LoopedConfig):
            raise TypeError(f"LoopedTransformer takes a LoopedConfig, got {type(cfg).__name__}")
        self.cfg = cfg.validate()
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size + cfg.bos, d)
        self.pos_emb = nn.Embedding(cfg.block_size + cfg.bos, d) if cfg.pos == 'learned' else None
        self.recall_proj = nn.Linear(2 * d, d, bias=cfg.bias) if cfg.recall == 'standard' else None  # W [h ; e]
        self.block = Block(cfg)
        self.ln_out = nn.LayerNorm(d, bias=cfg.bias) if cfg.outer_norm else nn.Identity()  # N_out
        self.ln_f = nn.LayerNorm(d, bias=cfg.bias)
        self.head = nn.Linear(d, 2 * d if cfg.pair_head else cfg.n_classes, bias=cfg.bias)
        self.apply(self._init_weights)
        with torch.no_grad():   # W [h ; e] starts near [I, 0]: the untrained loop carries its state forward
            for mix in (self.recall_proj, self.block.mix1, self.block.mix2):
                if mix is not None:
                    mix.weight[:, :d] += torch.eye(d)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, idx):  # idx: (B, T) long -> e: (B, T + bos, d)
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            kind = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise TypeError(f"the model takes a LongTensor (B, T) of token ids, got {kind}")
        if idx.dim() != 2:
            raise ValueError(f"the model takes token ids of shape (B, T), got shape {tuple(idx.shape)}")
        idx, T = idx.long(), idx.size(1)
        self.cfg.check_input(T)
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
        if self.recall_proj is not None:
            h = self.recall_proj(torch.cat((h, e), -1))              # W [h ; e]
        return self.ln_out(self.block(h, e))

    def readout(self, h):  # (B, T + bos, d) -> logits (B, T, n_classes), or (B, T, T) with pair_head
        out = self.head(self.ln_f(h[:, 1:] if self.cfg.bos else h))
        if not self.cfg.pair_head:
            return out
        q, k = out.chunk(2, dim=-1)                                   # (B, T, d) each
        return q @ k.transpose(1, 2) * q.size(-1) ** -0.5             # (B, T, T)

    def default_iters(self, T):
        return self.cfg.default_iters(T)

    def forward(self, idx, n_iters=None):
        """idx: LongTensor (B, T) -> logits (B, T, n_classes) after n_iters iterations, or the default rule."""
        return self.run(idx, n_iters)[0]

    def run(self, idx, n_iters=None):
        """Logits (B, T, n_classes) and the iterations each example ran (B,). n_iters=None is the default rule:
        default_iters(T) iterations, then with cfg.halt_tol > 0 each example goes on until its residual
        ||h_{t+1} - h_t|| / ||h_t|| is below halt_tol, at most cfg.cap_iters(T) in all. Labels are never read."""
        if n_iters is not None:
            check_iters(n_iters)
        e = self.embed(idx)
        h, used = self.initial_state(e), torch.zeros(idx.size(0), dtype=torch.long, device=e.device)
        T, halting = idx.size(1), n_iters is None and self.cfg.halt_tol > 0
        n = self.default_iters(T) if n_iters is None else n_iters
        for h, _, used in iterate(self.step, h, e, self.cfg.cap_iters(T) if halting else n,
                                  self.cfg.halt_tol if halting else 0.0, min_iters=n):
            pass
        return self.readout(h), used.clone()

    def flops_per_iter(self, T):
        """Forward FLOPs of one iteration for one sequence of length T (2 x multiply-adds)."""
        cfg, d = self.cfg, self.cfg.d_model
        mixes = {'standard': 1, 'internal_both': 2}.get(cfg.recall, 0)          # 2d -> d maps of [h ; e]
        matmul = 4 * d * d + 2 * mixes * d * d + (3 if cfg.recall == 'internal' else 2) * d * cfg.mlp_ratio * d
        T = T + cfg.bos
        attn = 2 * (min(T, cfg.window) if cfg.window else T) * d                # scores + weighted sum, per query
        return 2 * T * (matmul + attn)

    @classmethod
    def from_checkpoint(cls, path, map_location='cpu'):
        """Load a checkpoint written by train.py; CPU, eval mode. A one-line CheckpointError for a missing,
        corrupt or incompatible file."""
        ckpt = load_checkpoint(path, map_location)
        model = cls(config_from_dict(ckpt['config']['model'], path))
        load_weights(model, ckpt['model'], path)
        return model.eval()


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or does not fit the model asked for."""


def one_line(err):
    """An exception as one line for a user: its first line, and of a long line its first sentence."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else type(err).__name__
    if len(text) > 160 and '. ' in text[:160]:
        text = text[:text.index('. ') + 1]
    return text


def load_checkpoint(path, map_location='cpu'):
    """torch.load with weights_only=True; every failure is a one-line CheckpointError."""
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
    if (not isinstance(config, dict) or not isinstance(config.get('model'), dict)
            or not isinstance(config.get('train', {}), dict) or not isinstance(ckpt.get('model'), dict)):
        raise CheckpointError(f"{path} is not a looped checkpoint (missing model weights or config)")
    return ckpt


def load_weights(model, state, path):
    """model.load_state_dict(state), or a CheckpointError if the weights do not fit the model's config."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        lines = str(err).strip().splitlines()          # torch: a heading, then one line per problem
        detail = lines[1].strip().rstrip('.') if len(lines) > 1 else one_line(err)
        raise CheckpointError(f"{path}: weights do not match the stored config ({detail})")


def config_from_dict(d, source='checkpoint'):
    """A validated LoopedConfig from a checkpoint's dict, or a one-line CheckpointError."""
    unknown = set(d) - {f.name for f in fields(LoopedConfig)}
    if unknown:
        raise CheckpointError(f"{source}: unknown model config keys {sorted(unknown)}")
    try:
        return LoopedConfig(**d).validate()
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: bad model config: {one_line(err)}")
