"""Mamba-2: the selective state-space model in its state-space-duality (SSD) form, as a token mixer
(docs/papers.md#mamba2).

Per layer, with E = expand * D = H * P channels in H heads of P, and G groups of B, C (N each):

    [z, x, B, C, dt] = u W_in                      D -> E, E, G N, G N, H   (one projection, no bias)
    [x, B, C]        = SiLU(causal depth-wise conv_{d_conv}([x, B, C]) + bias)
    dt               = softplus(dt + b_dt)          [B, T, H], fp32
    h_t              = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T     per head: h [P, N], A = -exp(A_log) a scalar
    y_t              = h_t C_t + D x_t              (D one scalar per head; heads of a group share B, C)
    out              = RMSNorm_G(y * SiLU(z)) W_out    RMSNorm over each group's E / G channels, then a gain

The difference from Mamba-1 (layers/ssm/mamba.py) is A: one scalar per head instead of a
[E, S] diagonal, so the decay between two tokens is the same for every channel and state of a
head. The recurrence is then a masked attention-like product (the "duality"):

    y_i = sum_{j <= i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j,      cs_i = sum_{k <= i} dt_k A

`ssd` computes it two ways: `sequential` (a token loop, the obviously-correct twin, and what
one decoded token uses) and `chunked` (the SSD algorithm): the row is cut into chunks of C
tokens; inside a chunk the C x C masked product above (matmuls); across chunks a carried
state [B, H, P, N] passed by a short scan over the T / C chunks, entering each token decayed
by exp(cs_i). Cost O(T C (N + P) H + T P N H); memory O(T C H + (T / C) H P N).

Segments: the state is zeroed at every segment start (the within-chunk mask keeps j and i of
one segment; the carried state reaches only the tokens before a chunk's first reset) and the
conv reads only the token's segment, so packed examples and padding never mix.
Bidirectional (spec.causal=False): a forward and a backward branch (each its own conv, A, b_dt
and D) on the row and the flipped row, summed before the gated norm; W_in, the norm and W_out
are shared (the layout `mamba` uses). Decoding needs causal=True.

Sequence parallelism (the `scan` strategy): a chunk's summary is (exp(A sum_t dt_t) [0 if
it resets], its final state from zero), composed as Mamba-1's; the conv takes a halo.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import axes
from layers.core import Dense, param
from layers.mixer_base import SUMMARY, MixContext, Mixer, MixerSpec, sequence_parallel
from layers.ssm.mamba import INITS, _uniform, causal_conv, decode_resets, dt_bias_init, roll_conv_state, segment_starts

SCANS = ("chunked", "sequential")
HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------------------
# The SSD scan
# ----------------------------------------------------------------------------------------------------------------


def _ssd_sequential(x, dt, a, b, c, reset, h0):
  """x [B, T, G, R, P] (R heads per group), dt [B, T, G, R], a [G, R], b, c [B, T, G, N]."""

  def step(h, xs):
    xt, dtt, bt, ct, rt = xs
    decay = jnp.where(rt[:, None, None], 0.0, jnp.exp(dtt * a))  # [B, G, R]
    h = decay[..., None, None] * h + (dtt[..., None] * xt)[..., None] * bt[:, :, None, None, :]
    return h, jnp.einsum("bgrpn,bgn->bgrp", h, ct, precision=HIGHEST)

  time_major = tuple(jnp.swapaxes(v, 0, 1) for v in (x, dt, b, c, reset))
  h_last, ys = jax.lax.scan(step, h0, time_major)
  return jnp.swapaxes(ys, 0, 1), h_last


def _masked_exp(mask, log):
  """exp(log) where mask, else 0, with no inf or nan in either pass (log may be large outside mask)."""
  return jnp.exp(jnp.where(mask, log, -jnp.inf))


def _ssd_chunked(x, dt, a, b, c, reset, h0, chunk):
  bsz, t, g, r, p = x.shape
  cl = max(1, min(chunk, t))
  nc = -(-t // cl)
  pad = nc * cl - t
  if pad:  # dt = 0 makes a token the identity (decay 1, no input): the state passes through
    padt = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    x, dt, b, c, reset = map(padt, (x, dt, b, c, reset))
  split = lambda v: v.reshape(bsz, nc, cl, *v.shape[2:])  # [B, T, ...] -> [B, nc, C, ...]
  x, dt, b, c, reset = map(split, (x, dt, b, c, reset))
  xdt = x * dt[..., None]  # [B, nc, C, G, R, P]
  cs = jnp.cumsum(dt * a, axis=2)  # [B, nc, C, G, R]: log decay from the chunk's start
  run = jnp.cumsum(reset.astype(jnp.int32), axis=2)  # [B, nc, C]: segment starts so far in the chunk
  last = run[:, :, -1:]

  # Within a chunk: y_i += sum_{j <= i, same run} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j.
  i, j = jnp.arange(cl)[:, None], jnp.arange(cl)[None, :]
  same = (j <= i) & (run[:, :, :, None] == run[:, :, None, :])  # [B, nc, C, C]
  decay_ij = _masked_exp(same[..., None, None], cs[:, :, :, None] - cs[:, :, None, :])  # [B, nc, C, C, G, R]
  scores = jnp.einsum("bxign,bxjgn->bxijg", c, b, precision=HIGHEST)[..., None] * decay_ij
  y = jnp.einsum("bxijgr,bxjgrp->bxigrp", scores, xdt, precision=HIGHEST)

  # Each chunk's final state from zero: its last run's inputs decayed to the chunk's end.
  to_end = _masked_exp((run == last)[..., None, None], cs[:, :, -1:] - cs)  # [B, nc, C, G, R]
  states = jnp.einsum("bxjgrp,bxjgn->bxgrpn", xdt * to_end[..., None], b, precision=HIGHEST)
  chunk_decay = jnp.where((last[:, :, 0] == 0)[..., None, None], jnp.exp(cs[:, :, -1]), 0.0)  # [B, nc, G, R]

  # Across chunks: the state entering each chunk (a scan over nc steps of [B, G, R, P, N]).
  def step(h, inp):
    decay, state = inp
    return decay[..., None, None] * h + state, h

  h_last, h_in = jax.lax.scan(step, h0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(states, 1, 0)))
  h_in = jnp.moveaxis(h_in, 0, 1)  # [B, nc, G, R, P, N]
  from_start = _masked_exp((run == 0)[..., None, None], cs)  # [B, nc, C, G, R]: 0 after a reset
  y = y + jnp.einsum("bxign,bxgrpn->bxigrp", c, h_in, precision=HIGHEST) * from_start[..., None]
  return y.reshape(bsz, nc * cl, g, r, p)[:, :t], h_last


def ssd(x_bthp, dt_bth, a_h, b_btgn, c_btgn, *, reset_bt=None, h0_bhpn=None, impl: str = "chunked", chunk: int = 64):
  """h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t  per head h (no D skip), in fp32.

  x [B, T, H, P], dt [B, T, H] (already softplus'd), a [H] (negative), b, c [B, T, G, N] with
  G dividing H (heads g*H/G .. (g+1)*H/G - 1 read group g). reset_bt: True where a segment
  starts (the state is zeroed before that token). h0_bhpn: the state entering token 0.
  Returns (y [B, T, H, P], h_last [B, H, P, N]), both fp32.
  """
  if impl not in SCANS:
    raise ValueError(f"ssd impl={impl!r} is not one of {SCANS}")
  bsz, t, h, p = x_bthp.shape
  g, n = b_btgn.shape[2], b_btgn.shape[3]
  if h % g:
    raise ValueError(f"ssd needs the groups of B and C ({g}) to divide the heads ({h})")
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  r = h // g
  x = f32(x_bthp).reshape(bsz, t, g, r, p)
  dt = f32(dt_bth).reshape(bsz, t, g, r)
  a = f32(a_h).reshape(g, r)
  b, c = f32(b_btgn), f32(c_btgn)
  reset = jnp.zeros((bsz, t), bool) if reset_bt is None else jnp.asarray(reset_bt, bool)
  h0 = jnp.zeros((bsz, g, r, p, n), jnp.float32) if h0_bhpn is None else f32(h0_bhpn).reshape(bsz, g, r, p, n)
  if impl == "sequential":
    y, h_last = _ssd_sequential(x, dt, a, b, c, reset, h0)
  else:
    y, h_last = _ssd_chunked(x, dt, a, b, c, reset, h0, int(chunk))
  return y.reshape(bsz, t, h, p), h_last.reshape(bsz, h, p, n)


def ssd_chunk_decay(dt_bth, a_h, reset_bt=None):
  """The factor a stretch of tokens applies to its incoming state, exp(A_h sum_t dt_t) (0 if it
  resets), shaped [B, H, 1, 1] so that with `ssd`'s h_last it composes by `mamba.combine`."""
  decay = jnp.exp(jnp.sum(dt_bth.astype(jnp.float32), axis=1) * a_h.astype(jnp.float32))
  if reset_bt is not None:
    decay = jnp.where(jnp.any(reset_bt, axis=1)[:, None], 0.0, decay)
  return decay[..., None, None]


def gated_rms_norm(y_bthp, z_bthp, weight_hp, groups: int, eps: float = 1e-5):
  """RMSNorm(y * SiLU(z)) over each group's channels (heads g*H/G .. of P), times the gain; fp32."""
  bsz, t, h, p = y_bthp.shape
  v = (y_bthp.astype(jnp.float32) * jax.nn.silu(z_bthp.astype(jnp.float32))).reshape(bsz, t, groups, -1)
  v = v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)
  return v.reshape(bsz, t, h, p) * weight_hp.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# The mixer
# ----------------------------------------------------------------------------------------------------------------


class SSDBranch(nnx.Module):
  """The part of Mamba-2 that sees token order: the conv over [x, B, C], dt's bias, A, the scan, D."""

  def __init__(self, heads: int, head_dim: int, groups: int, d_state: int, d_conv: int, dt_min: float,
               dt_max: float, a_min: float, a_max: float, *, rngs: nnx.Rngs):
    h, p, g, n, k = heads, head_dim, groups, d_state, d_conv
    self.heads, self.head_dim, self.groups, self.d_state = h, p, g, n
    # PyTorch's Conv1d default for a depth-wise kernel, U(+-1/sqrt(K)), split into x's channels
    # (sharded with the heads) and B, C's (whole).
    conv = _uniform(1.0 / math.sqrt(k))
    self.conv_x_weight = param(rngs, conv, (k, h, p), (None, axes.HEADS, axes.HEAD_DIM))
    # Biases and gains are vectors in the reference (not decayed), here shaped by head: say so.
    self.conv_x_bias = param(rngs, conv, (h, p), (axes.HEADS, axes.HEAD_DIM), weight_decay=False)
    self.conv_bc_weight = param(rngs, conv, (k, 2, g, n), (None, None, None, axes.STATE))
    self.conv_bc_bias = param(rngs, conv, (2, g, n), (None, None, axes.STATE), weight_decay=False)
    self.dt_bias = param(rngs, dt_bias_init(dt_min, dt_max), (h,), (axes.HEADS,), weight_decay=False)
    a_log = lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, dtype, a_min, a_max))
    self.a_log = param(rngs, a_log, (h,), (axes.HEADS,), weight_decay=False)
    self.skip = param(rngs, jax.nn.initializers.ones, (h,), (axes.HEADS,), weight_decay=False)

  def conv_params(self):
    """The conv over the concatenated channels [x (H P), B (G N), C (G N)]: weight [K, E + 2GN], bias."""
    k = self.conv_x_weight.shape[0]
    w = jnp.concatenate([self.conv_x_weight[...].reshape(k, -1), self.conv_bc_weight[...].reshape(k, -1)], axis=1)
    b = jnp.concatenate([self.conv_x_bias[...].reshape(-1), self.conv_bc_bias[...].reshape(-1)])
    return w, b

  def __call__(self, xbc_btc, dt_bth, segment_ids_bt, reset_bt, *, impl: str, chunk: int, h0=None, context=None,
               context_segment_ids=None, hold_bt=None, sequence=None):
    """xbc: [x, B, C] before the conv, [B, T, E + 2GN]; dt: before the bias and softplus.
    hold_bt: True where a token must leave the state unchanged (padding inside a decode call)."""
    sp = sequence
    w, bias = self.conv_params()
    if sp is not None and context is None:
      conv = lambda v, seg, w, b: causal_conv(v, seg, w, b)
      xbc = sp.halo(conv, xbc_btc, segment_ids_bt, w, bias, left=w.shape[0] - 1, right=0,
                    logical=(axes.BATCH, axes.LENGTH, None))
    else:
      xbc = causal_conv(xbc_btc, segment_ids_bt, w, bias, context, context_segment_ids)
    xbc = jax.nn.silu(xbc)
    bsz, t, _ = xbc.shape
    h, p, g, n = self.heads, self.head_dim, self.groups, self.d_state
    x = xbc[..., :h * p].reshape(bsz, t, h, p)
    b = xbc[..., h * p:h * p + g * n].reshape(bsz, t, g, n)
    c = xbc[..., h * p + g * n:].reshape(bsz, t, g, n)
    dt = jax.nn.softplus(dt_bth.astype(jnp.float32) + self.dt_bias[...])
    if hold_bt is not None:
      dt = jnp.where(hold_bt[..., None], 0.0, dt)
    a = -jnp.exp(self.a_log[...])
    if sp is not None and sp.needs == SUMMARY and h0 is None:
      y, h_last = sp.ssd(x, dt, a, b, c, reset_bt, impl=impl, chunk=chunk), None
    else:
      y, h_last = ssd(x, dt, a, b, c, reset_bt=reset_bt, h0_bhpn=h0, impl=impl, chunk=chunk)
    y = y + self.skip[...][:, None] * x.astype(jnp.float32)
    return y, h_last


class Mamba2(Mixer):
  """Mamba-2 (SSD) as the mixer of a pre-norm block: d_model -> d_model (config group `model.mamba2`).

  Options: d_state (N, 128), head_dim (P, 64), expand (E = expand * d_model = H * P, 2), groups
  (G, 1: B and C shared by H / G heads each), d_conv (4), scan ("chunked" | "sequential"),
  chunk (64), dt_min (0.001), dt_max (0.1), a_min / a_max (A's magnitude drawn uniformly from
  [1, 16]), init ("default" | "reference" | "zoology").
  """

  SEQUENCE_CAPABILITIES = frozenset({SUMMARY})

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    d = spec.d_model
    self.spec = spec
    opt = spec.option
    self.d_state = int(opt("d_state", 128))
    self.head_dim = int(opt("head_dim", 64))
    self.groups = int(opt("groups", 1))
    self.d_conv = int(opt("d_conv", 4))
    self.d_inner = int(opt("expand", 2) * d)
    self.scan = str(opt("scan", "chunked"))
    self.chunk = int(opt("chunk", 64))
    dt_min, dt_max = float(opt("dt_min", 0.001)), float(opt("dt_max", 0.1))
    a_min, a_max = float(opt("a_min", 1.0)), float(opt("a_max", 16.0))
    init = str(opt("init", "default"))
    if self.scan not in SCANS:
      raise ValueError(f"model.mamba2.scan={self.scan!r} is not one of {', '.join(SCANS)}")
    if init not in INITS:
      raise ValueError(f"model.mamba2.init={init!r} is not one of {', '.join(INITS)}")
    for key, value in (("d_state", self.d_state), ("head_dim", self.head_dim), ("groups", self.groups),
                       ("d_conv", self.d_conv), ("chunk", self.chunk), ("expand * d_model", self.d_inner)):
      if value < 1:
        raise ValueError(f"model.mamba2.{key}={value} must be at least 1")
    if self.d_inner % self.head_dim:
      raise ValueError(f"model.mamba2.head_dim={self.head_dim} must divide the inner width expand * d_model = "
                       f"{self.d_inner}")
    self.heads = self.d_inner // self.head_dim
    if self.heads % self.groups:
      raise ValueError(f"model.mamba2.groups={self.groups} must divide the {self.heads} heads "
                       f"(expand * d_model / head_dim)")
    if not 0 < dt_min <= dt_max:
      raise ValueError(f"model.mamba2.dt_min={dt_min} and dt_max={dt_max} need 0 < dt_min <= dt_max")
    if not 0 < a_min <= a_max:
      raise ValueError(f"model.mamba2.a_min={a_min} and a_max={a_max} need 0 < a_min <= a_max")
    h, p, g, n = self.heads, self.head_dim, self.groups, self.d_state
    emb = (axes.EMBED,)
    # W_in in three parts (z and x sharded with the heads; B, C whole; dt per head): together
    # the reference's one D -> 2E + 2GN + H projection.
    self.in_zx = Dense((d,), (2, h, p), in_axes=emb, out_axes=(None, axes.HEADS, axes.HEAD_DIM), rngs=rngs)
    self.in_bc = Dense((d,), (2, g, n), in_axes=emb, out_axes=(None, None, axes.STATE), rngs=rngs)
    self.in_dt = Dense((d,), (h,), in_axes=emb, out_axes=(axes.HEADS,), rngs=rngs)
    branch = lambda: SSDBranch(h, p, g, n, self.d_conv, dt_min, dt_max, a_min, a_max, rngs=rngs)
    self.forward_ssm = branch()
    self.backward_ssm = None if spec.causal else branch()
    self.norm_weight = param(rngs, jax.nn.initializers.ones, (h, p), (axes.HEADS, axes.HEAD_DIM),
                             weight_decay=False)
    self.out_proj = Dense((h, p), (d,), in_axes=(axes.HEADS, axes.HEAD_DIM), out_axes=(axes.EMBED,), rngs=rngs,
                          init_scale=1.0 / math.sqrt(2 * spec.num_layers))
    if init != "default":
      self._reinit(init, rngs)

  def _reinit(self, init: str, rngs: nnx.Rngs) -> None:
    """"reference": PyTorch's Linear default U(+-1/sqrt(fan_in)) for W_in and W_out, W_out then
    divided by sqrt(residual branches per block * layers) (the reference model's rescaling);
    "zoology": N(0, 0.02) for W_in, N(0, 0.02 / sqrt(2 layers)) for W_out. b_dt, A, D and the
    conv keep their own initialisations under both (b_dt is not a Linear bias in Mamba-2)."""
    redraw = lambda p, fn: p.set_value(fn(rngs.params(), p.shape, p.dtype))
    inner = [self.in_zx.kernel, self.in_bc.kernel, self.in_dt.kernel]
    layers, branches = self.spec.num_layers, self.spec.residual_branches
    if init == "reference":
      for p in inner:
        redraw(p, _uniform(1.0 / math.sqrt(self.spec.d_model)))
      redraw(self.out_proj.kernel, _uniform(1.0 / math.sqrt(self.d_inner) / math.sqrt(branches * layers)))
    else:  # zoology
      for p in inner:
        redraw(p, jax.nn.initializers.normal(0.02))
      redraw(self.out_proj.kernel, jax.nn.initializers.normal(0.02 / math.sqrt(2 * layers)))

  def _project(self, x_btd):
    zx = self.in_zx(x_btd)
    bc = self.in_bc(x_btd)
    bsz, t = x_btd.shape[:2]
    xbc = jnp.concatenate([zx[:, :, 1].reshape(bsz, t, -1), bc.reshape(bsz, t, -1)], axis=-1)
    return zx[:, :, 0], xbc, self.in_dt(x_btd)

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    if not self.spec.causal:
      raise ValueError("mamba2 with causal=False (forward + backward scans) cannot decode incrementally; "
                       "decoding needs causal=True")
    channels = self.d_inner + 2 * self.groups * self.d_state
    self.conv_state = nnx.Cache(jnp.zeros((batch, self.d_conv - 1, channels), dtype))
    self.conv_segment_ids = nnx.Cache(jnp.zeros((batch, self.d_conv - 1), jnp.int32))
    self.ssm_state = nnx.Cache(jnp.zeros((batch, self.heads, self.head_dim, self.d_state), jnp.float32))
    self.last_segment_id = nnx.Cache(jnp.zeros((batch,), jnp.int32))

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    if ctx.index is not None:
      raise ValueError("mamba2 needs tokens in storage order; a permuted layout (ctx.index, e.g. zigzag "
                       "load balancing) is not supported")
    z, xbc, dt = self._project(x_btd)
    seg = ctx.segment_ids.astype(jnp.int32)
    if ctx.decode:
      y = self._decode(xbc, dt, seg)
    else:
      sp = sequence_parallel(self)
      y, _ = self.forward_ssm(xbc, dt, seg, segment_starts(seg), impl=self.scan, chunk=self.chunk, sequence=sp)
      if self.backward_ssm is not None:
        flip = lambda v: jnp.flip(v, axis=1)
        y_back, _ = self.backward_ssm(flip(xbc), flip(dt), flip(seg), segment_starts(flip(seg)), impl=self.scan,
                                      chunk=self.chunk, sequence=sp)
        y = y + flip(y_back)
    y = gated_rms_norm(y, z, self.norm_weight[...], self.groups).astype(x_btd.dtype)
    out = self.out_proj(y)
    return jnp.where((seg != 0)[..., None], out, 0).astype(x_btd.dtype)

  def _decode(self, xbc_btc, dt_bth, seg_bt):
    if not self.spec.causal:
      raise ValueError("mamba2 with causal=False cannot decode incrementally; decoding needs causal=True")
    if getattr(self, "ssm_state", None) is None:
      raise ValueError("decode=True needs init_cache(batch, max_len, dtype) first")
    # Padding in a decode call is transparent (as in `mamba`): no state update, no conv state.
    seg_filled, reset = decode_resets(seg_bt, self.last_segment_id[...])
    impl = self.scan if seg_bt.shape[1] > 1 else "sequential"
    y, h_last = self.forward_ssm(xbc_btc, dt_bth, seg_bt, reset, impl=impl, chunk=self.chunk, h0=self.ssm_state[...],
                                 context=self.conv_state[...], context_segment_ids=self.conv_segment_ids[...],
                                 hold_bt=seg_bt == 0)
    if self.d_conv > 1:
      self.conv_state[...], self.conv_segment_ids[...] = roll_conv_state(
          self.conv_state[...], self.conv_segment_ids[...], xbc_btc, seg_bt)
    self.ssm_state[...] = h_last
    self.last_segment_id[...] = seg_filled[:, -1]
    return y
