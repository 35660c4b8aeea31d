"""Mamba ("Mamba-1" selective state-space model; docs/papers.md#mamba) as a token mixer.

    [x_in, z]   = x W_in                                   D -> 2E
    x_c         = SiLU(causal depth-wise conv_4(x_in))      taps limited to the token's segment
    [dt, B, C]  = x_c W_x                                  E -> R + 2S (B_t, C_t shared by channels)
    delta       = softplus(dt W_dt + b_dt)                 [B, T, E], fp32
    h_t         = exp(delta_t A) * h_{t-1} + (delta_t x_c,t) B_t      A = -exp(A_log), [E, S]
    y_t         = h_t C_t + D * x_c,t
    out         = (y * SiLU(z)) W_out                      E -> D

The recurrence is `selective_scan`, a pure function with three interchangeable
implementations (`sequential` is the obviously-correct twin of the other two):

* sequential:  lax.scan over tokens (reverse mode keeps every state: O(T E S) memory);
* associative: lax.associative_scan over (decay, input) pairs (O(T E S) memory);
* chunked:     lax.scan over chunks of `chunk` tokens carrying the [B, E, S] state; inside a
               chunk an associative scan (`inner="associative"`, parallel over the chunk's
               tokens: accelerators) or a token loop (`inner="sequential"`: CPU, where its gradient
               ran 3.9x faster at B=64, T=256, E=256; BENCHMARKS.md); `inner="auto"` picks by backend. Each chunk body is rematerialised
               (jax.checkpoint), so neither the forward nor the backward pass ever holds more
               than [B, chunk, E, S] of states: O(T E + chunk E S) memory.

Segments: the state is zeroed at every segment start (`reset_bt`) and the conv taps only
read tokens of the same segment, so packed examples and padding (segment 0) never mix.
Bidirectional (spec.causal=False): the sum of a forward branch and a backward branch run on
the flipped row, each with its own conv and SSM parameters, sharing W_in, the gate and
W_out (the Vision-Mamba layout). Decoding needs causal=True.

Sequence parallelism (the `scan` strategy, parallel/scan.py): a chunk's summary is
(`chunk_decay(delta, A, reset)`, h_last of `selective_scan(..., h0_bds=None)`), composed by
(a1, h1) o (a2, h2) = (a1 a2, a2 h1 + h2); each device reruns its chunk from its incoming
state h_in. The conv receives the previous device's last d_conv-1 x_in tokens and segment ids
by a halo exchange (`Strategy.halo`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import axes
from layers.core import Dense, param
from layers.linear.core import forward_fill
from layers.mixer_base import SUMMARY, MixContext, Mixer, MixerSpec, sequence_parallel

SCANS = ("sequential", "associative", "chunked")
INNERS = ("auto", "associative", "sequential")  # the chunked scan's algorithm inside a chunk
# The scan's contractions stay in full fp32 (on GPUs the default for fp32 matmuls is TF32).
HIGHEST = jax.lax.Precision.HIGHEST
DT_INIT_FLOOR = 1e-4


# ----------------------------------------------------------------------------------------------------------------
# The selective scan
# ----------------------------------------------------------------------------------------------------------------


def _decay_and_input(x_btd, delta_btd, a_ds, b_bts, reset_bt):
  """exp(delta A) (0 where the state resets) and (delta x) B: both [B, T, D, S]."""
  decay = jnp.exp(delta_btd[..., None] * a_ds)
  decay = jnp.where(reset_bt[:, :, None, None], 0.0, decay)
  inp = (delta_btd * x_btd)[..., None] * b_bts[:, :, None, :]
  return decay, inp


def combine(earlier, later):
  """Composition of two steps h -> a h + b (earlier first): associative."""
  a1, h1 = earlier
  a2, h2 = later
  return a1 * a2, a2 * h1 + h2


def _scan_sequential(x, delta, a, b, c, reset, h0):
  def step(h, xs):
    xt, dt, bt, ct, rt = xs
    decay = jnp.where(rt[:, None, None], 0.0, jnp.exp(dt[..., None] * a))
    h = decay * h + (dt * xt)[..., None] * bt[:, None, :]
    return h, jnp.einsum("bds,bs->bd", h, ct, precision=HIGHEST)

  time_major = tuple(jnp.swapaxes(v, 0, 1) for v in (x, delta, b, c, reset))
  h_last, ys = jax.lax.scan(step, h0, time_major)
  return jnp.swapaxes(ys, 0, 1), h_last


def _scan_associative(x, delta, a, b, c, reset, h0):
  decay, inp = _decay_and_input(x, delta, a, b, reset)
  inp = inp.at[:, 0].add(decay[:, 0] * h0)  # the incoming state enters through the first step
  _, hs = jax.lax.associative_scan(combine, (decay, inp), axis=1)
  return jnp.einsum("btds,bts->btd", hs, c, precision=HIGHEST), hs[:, -1]


def _scan_chunked(x, delta, a, b, c, reset, h0, chunk, inner):
  bsz, t, d = x.shape
  cl = max(1, min(chunk, t))
  nc = -(-t // cl)
  pad = nc * cl - t
  if pad:
    # delta = 0 makes a step the identity (decay 1, input 0): the state passes through.
    padt = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    x, delta, b, c, reset = map(padt, (x, delta, b, c, reset))
  # [B, nc*C, ...] -> [nc, B, C, ...]: the scan walks over chunks.
  split = lambda v: jnp.moveaxis(v.reshape(bsz, nc, cl, *v.shape[2:]), 1, 0)

  @jax.checkpoint  # the backward pass recomputes a chunk's [B, C, D, S] states instead of storing them
  def body(h_bds, xs):
    xc, dc, bc, cc, rc = xs
    if inner == "sequential":
      y, h_last = _scan_sequential(xc, dc, a, bc, cc, rc, h_bds)
      return h_last, y
    decay, inp = _decay_and_input(xc, dc, a, bc, rc)
    prod, hs = jax.lax.associative_scan(combine, (decay, inp), axis=1)
    hs = hs + prod * h_bds[:, None]  # the carried state, decayed to each token (0 after a reset)
    return hs[:, -1], jnp.einsum("bcds,bcs->bcd", hs, cc, precision=HIGHEST)

  h_last, ys = jax.lax.scan(body, h0, tuple(map(split, (x, delta, b, c, reset))))
  return jnp.moveaxis(ys, 0, 1).reshape(bsz, nc * cl, d)[:, :t], h_last


def selective_scan(x_btd, delta_btd, a_ds, b_bts, c_bts, *, reset_bt=None, h0_bds=None, impl: str = "chunked",
                   chunk: int = 64, inner: str = "auto"):
  """h_t = exp(delta_t A) h_{t-1} + (delta_t x_t) B_t,  y_t = h_t C_t  (no D skip), in fp32.

  reset_bt: True where a new segment starts: the carried state is zeroed before that token.
  h0_bds: the state entering token 0 (zeros when None). Returns (y_btd, h_last_bds: the
  state after the last token), both fp32 whatever the inputs' dtype, so that callers add
  the D skip or an incoming-state correction before rounding. inner: the chunked scan's
  algorithm inside a chunk (see the module docstring); "auto" = a token loop on CPU and the
  associative scan on accelerators.
  """
  if impl not in SCANS:
    raise ValueError(f"selective_scan impl={impl!r} is not one of {SCANS}")
  if inner not in INNERS:
    raise ValueError(f"selective_scan inner={inner!r} is not one of {INNERS}")
  if inner == "auto":
    inner = "sequential" if jax.default_backend() == "cpu" else "associative"
  bsz, t, d = x_btd.shape
  s = a_ds.shape[-1]
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  x, delta, a, b, c = map(f32, (x_btd, delta_btd, a_ds, b_bts, c_bts))
  reset = jnp.zeros((bsz, t), bool) if reset_bt is None else jnp.asarray(reset_bt, bool)
  h0 = jnp.zeros((bsz, d, s), jnp.float32) if h0_bds is None else f32(h0_bds)
  if impl == "sequential":
    y, h = _scan_sequential(x, delta, a, b, c, reset, h0)
  elif impl == "associative":
    y, h = _scan_associative(x, delta, a, b, c, reset, h0)
  else:
    y, h = _scan_chunked(x, delta, a, b, c, reset, h0, int(chunk), inner)
  return y, h


def chunk_decay(delta_btd, a_ds, reset_bt=None):
  """The factor a chunk applies to its incoming state: exp(A * sum_t delta_t), 0 if it resets.

  With `selective_scan`'s h_last from a zero state this is the chunk's summary for a
  sequence-parallel scan: (decay [B, D, S], h_last [B, D, S]), composed by `combine`.
  """
  decay = jnp.exp(jnp.sum(delta_btd.astype(jnp.float32), axis=1)[..., None] * a_ds.astype(jnp.float32))
  if reset_bt is None:
    return decay
  return jnp.where(jnp.any(reset_bt, axis=1)[:, None, None], 0.0, decay)


def segment_starts(segment_ids_bt, previous_bt1=None):
  """True where a token's segment differs from the previous token's (token 0: vs `previous`, or always)."""
  first = (jnp.ones_like(segment_ids_bt[:, :1], bool) if previous_bt1 is None
           else segment_ids_bt[:, :1] != previous_bt1)
  return jnp.concatenate([first, segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)


def decode_resets(segment_ids_bt, last_segment_id_b):
  """In a decode call: (ids with padding forward-filled from the previous call's last id, True
  where a real token starts a segment). Padding continues the run around it."""
  filled = forward_fill(segment_ids_bt, last_segment_id_b)
  return filled, segment_starts(filled, last_segment_id_b[:, None]) & (segment_ids_bt != 0)


def roll_conv_state(state_bke, state_segment_ids_bk, x_bte, segment_ids_bt):
  """The decode conv state after a call: the last K-1 real tokens of (state, x) and their ids
  (a stable sort puts padding first and keeps real tokens in order)."""
  keep = state_bke.shape[1]
  xs = jnp.concatenate([state_bke, x_bte.astype(state_bke.dtype)], axis=1)
  segs = jnp.concatenate([state_segment_ids_bk, segment_ids_bt], axis=1)
  order = jnp.argsort(segs != 0, axis=1, stable=True)[:, -keep:]
  return jnp.take_along_axis(xs, order[..., None], axis=1), jnp.take_along_axis(segs, order, axis=1)


def causal_conv(x_bte, segment_ids_bt, weight_ke, bias_e, context_bke=None, context_segment_ids_bk=None):
  """out_t = bias + sum_k w_k x_{t-K+1+k}, reading only taps of token t's segment.

  `context` holds the K-1 tokens before x (decode state, or a neighbour device's tail);
  without it they are absent (masked).
  """
  k = weight_ke.shape[0]
  bsz, t, e = x_bte.shape
  if context_bke is None:
    context_bke = jnp.zeros((bsz, k - 1, e), x_bte.dtype)
    context_segment_ids_bk = jnp.full((bsz, k - 1), -1, segment_ids_bt.dtype)
  xs = jnp.concatenate([context_bke.astype(x_bte.dtype), x_bte], axis=1)
  segs = jnp.concatenate([context_segment_ids_bk.astype(segment_ids_bt.dtype), segment_ids_bt], axis=1)
  w = weight_ke.astype(x_bte.dtype)
  out = jnp.broadcast_to(bias_e.astype(x_bte.dtype), x_bte.shape)
  for j in range(k):
    same = (segs[:, j:j + t] == segment_ids_bt)[..., None]
    out = out + jnp.where(same, xs[:, j:j + t], 0) * w[j]
  return out


# ----------------------------------------------------------------------------------------------------------------
# The mixer
# ----------------------------------------------------------------------------------------------------------------


# `model.mamba.init`: "default" (every Dense N(0, 1/fan_in), W_out also / sqrt(2 * layers)),
# "reference" (the reference Mamba model's) or "zoology" (Zoology's re-initialisation).
INITS = ("default", "reference", "zoology")


def _uniform(bound: float):
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def dt_bias_init(dt_min: float, dt_max: float):
  """b_dt = softplus^{-1}(dt), dt log-uniform in [dt_min, dt_max] (floored at 1e-4)."""

  def init(key, shape, dtype):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, DT_INIT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init


class SSMBranch(nnx.Module):
  """The part of Mamba that sees the order of tokens: conv, input-dependent (delta, B, C), scan, D skip."""

  def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int, dt_min: float, dt_max: float, *,
               rngs: nnx.Rngs):
    e, s, mlp = d_inner, d_state, axes.MLP
    # PyTorch's Conv1d default for a depth-wise kernel: U(+-1/sqrt(K)) for weights and bias.
    self.conv_weight = param(rngs, _uniform(1.0 / math.sqrt(d_conv)), (d_conv, e), (None, mlp))
    self.conv_bias = param(rngs, _uniform(1.0 / math.sqrt(d_conv)), (e,), (mlp,))
    self.x_dt = Dense((e,), (dt_rank,), in_axes=(mlp,), out_axes=(None,), rngs=rngs)
    self.x_b = Dense((e,), (s,), in_axes=(mlp,), out_axes=(axes.STATE,), rngs=rngs)
    self.x_c = Dense((e,), (s,), in_axes=(mlp,), out_axes=(axes.STATE,), rngs=rngs)
    self.dt_weight = param(rngs, _uniform(dt_rank ** -0.5), (dt_rank, e), (None, mlp))
    self.dt_bias = param(rngs, dt_bias_init(dt_min, dt_max), (e,), (mlp,))
    # S4D-real: A = -(1, ..., S) for every channel. Not weight-decayed (as in the reference
    # code): decay would pull every A_log toward 0, i.e. every A toward -1, erasing the spectrum.
    a_log = lambda key, shape, dtype: jnp.broadcast_to(jnp.log(jnp.arange(1, s + 1, dtype=dtype)), shape)
    self.a_log = param(rngs, a_log, (e, s), (mlp, axes.STATE), weight_decay=False)
    self.skip = param(rngs, jax.nn.initializers.ones, (e,), (mlp,))

  def delta(self, xc_bte):
    dt = self.x_dt(xc_bte).astype(jnp.float32) @ self.dt_weight[...]
    return jax.nn.softplus(dt + self.dt_bias[...])

  def __call__(self, x_in_bte, segment_ids_bt, reset_bt, *, impl: str, chunk: int, h0_bes=None,
               context_bke=None, context_segment_ids_bk=None, hold_bt=None, sequence=None):
    """hold_bt: True where a token must leave the state unchanged (delta = 0: exp(0 A) = 1 and
    no input), i.e. padding inside a decode call."""
    sp = sequence  # the owning mixer's sequence-parallel strategy (None: none / the compiler's)
    w, bias = self.conv_weight[...], self.conv_bias[...]
    if sp is not None and context_bke is None:
      # The length is split: the conv's d_conv - 1 earlier tokens come from the left neighbour.
      conv = lambda x, seg, w, b: causal_conv(x, seg, w, b)
      xc = sp.halo(conv, x_in_bte, segment_ids_bt, w, bias, left=w.shape[0] - 1, right=0,
                   logical=(axes.BATCH, axes.LENGTH, axes.MLP))
    else:
      xc = causal_conv(x_in_bte, segment_ids_bt, w, bias, context_bke, context_segment_ids_bk)
    xc = jax.nn.silu(xc)
    a = -jnp.exp(self.a_log[...])
    if sp is not None and sp.needs == SUMMARY and h0_bes is None:
      # The projections are per token; only the scan needs the cross-device state (parallel/scan.py).
      y, h_last = sp.selective_scan(xc, self.delta(xc), a, self.x_b(xc), self.x_c(xc), reset_bt, impl=impl,
                                    chunk=chunk), None
    else:
      delta = self.delta(xc)
      if hold_bt is not None:
        delta = jnp.where(hold_bt[..., None], 0.0, delta)
      y, h_last = selective_scan(xc, delta, a, self.x_b(xc), self.x_c(xc), reset_bt=reset_bt,
                                 h0_bds=h0_bes, impl=impl, chunk=chunk)
    y = y + self.skip[...] * xc.astype(jnp.float32)
    return y.astype(x_in_bte.dtype), h_last


class Mamba(Mixer):
  """Mamba block as the mixer of a pre-norm block: d_model -> d_model (config group `model.mamba`).

  Options: d_state (S, 16), expand (E = expand * d_model, 2), d_conv (4), dt_rank (0 =
  ceil(d_model / 16)), scan ("chunked" | "associative" | "sequential"), chunk (64),
  dt_min (0.001), dt_max (0.1).
  """

  # Each device scans its chunk; chunk states are combined across devices (parallel/scan.py).
  SEQUENCE_CAPABILITIES = frozenset({SUMMARY})

  def __init__(self, spec: MixerSpec, *, rngs: nnx.Rngs):
    d = spec.d_model
    self.spec = spec
    self.d_state = int(spec.option("d_state", 16))
    self.d_conv = int(spec.option("d_conv", 4))
    self.d_inner = int(spec.option("expand", 2) * d)
    self.dt_rank = int(spec.option("dt_rank", 0)) or math.ceil(d / 16)
    self.scan = str(spec.option("scan", "chunked"))
    self.chunk = int(spec.option("chunk", 64))
    dt_min, dt_max = float(spec.option("dt_min", 0.001)), float(spec.option("dt_max", 0.1))
    if self.scan not in SCANS:
      raise ValueError(f"model.mamba.scan={self.scan!r} is not one of {', '.join(SCANS)}")
    for key, value in (("d_state", self.d_state), ("d_conv", self.d_conv), ("chunk", self.chunk),
                       ("dt_rank", self.dt_rank), ("expand * d_model", self.d_inner)):
      if value < 1:
        raise ValueError(f"model.mamba.{key}={value} must be at least 1")
    if not 0 < dt_min <= dt_max:
      raise ValueError(f"model.mamba.dt_min={dt_min} and dt_max={dt_max} need 0 < dt_min <= dt_max")
    e = self.d_inner
    self.in_proj = Dense((d,), (2, e), in_axes=(axes.EMBED,), out_axes=(None, axes.MLP), rngs=rngs)
    branch = lambda: SSMBranch(e, self.d_state, self.d_conv, self.dt_rank, dt_min, dt_max, rngs=rngs)
    self.forward_ssm = branch()
    self.backward_ssm = None if spec.causal else branch()
    self.out_proj = Dense((e,), (d,), in_axes=(axes.MLP,), out_axes=(axes.EMBED,), rngs=rngs,
                          init_scale=1.0 / math.sqrt(2 * spec.num_layers))
    init = str(spec.option("init", "default"))
    if init not in INITS:
      raise ValueError(f"model.mamba.init={init!r} is not one of {', '.join(INITS)}")
    if init != "default":
      self._reinit(init, rngs)

  def _reinit(self, init: str, rngs: nnx.Rngs) -> None:
    """Re-draws the projections as the reference Mamba model or Zoology initialise them
    (docs/papers.md#mamba): "reference": PyTorch's Linear default U(+-1/sqrt(fan_in)) for
    W_in and W_x, the same divided by sqrt(residual branches per block * layers) for W_out
    (the reference model's prenorm-residual rescaling), W_dt, b_dt and the conv as before;
    "zoology": N(0, 0.02) for W_in, W_x and W_dt, N(0, 0.02 / sqrt(2 * layers)) for W_out,
    b_dt = 0 (every Linear bias zeroed, so delta starts near softplus(0)), the conv as before."""
    redraw = lambda p, fn: p.set_value(fn(rngs.params(), p.shape, p.dtype))
    layers, branches = self.spec.num_layers, self.spec.residual_branches
    ssm = [b for b in (self.forward_ssm, self.backward_ssm) if b is not None]
    inner = [self.in_proj.kernel] + [dense.kernel for b in ssm for dense in (b.x_dt, b.x_b, b.x_c)]
    if init == "reference":
      for p in inner:  # every kernel here has one input axis first: fan_in = shape[0]
        redraw(p, _uniform(1.0 / math.sqrt(p.shape[0])))
      redraw(self.out_proj.kernel, _uniform(1.0 / math.sqrt(self.d_inner) / math.sqrt(branches * layers)))
    else:  # zoology
      normal = jax.nn.initializers.normal(0.02)
      for p in inner + [b.dt_weight for b in ssm]:
        redraw(p, normal)
      for b in ssm:
        redraw(b.dt_bias, jax.nn.initializers.zeros)
      redraw(self.out_proj.kernel, jax.nn.initializers.normal(0.02 / math.sqrt(2 * layers)))

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    if not self.spec.causal:
      raise ValueError("mamba with causal=False (forward + backward scans) cannot decode incrementally; "
                       "decoding needs causal=True")
    self.conv_state = nnx.Cache(jnp.zeros((batch, self.d_conv - 1, self.d_inner), dtype))
    self.conv_segment_ids = nnx.Cache(jnp.zeros((batch, self.d_conv - 1), jnp.int32))
    self.ssm_state = nnx.Cache(jnp.zeros((batch, self.d_inner, self.d_state), jnp.float32))
    self.last_segment_id = nnx.Cache(jnp.zeros((batch,), jnp.int32))

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    if ctx.index is not None:
      raise ValueError("mamba needs tokens in storage order; a permuted layout (ctx.index, e.g. zigzag "
                       "load balancing) is not supported")
    xz = self.in_proj(x_btd)
    x_in, z = xz[:, :, 0], xz[:, :, 1]
    seg = ctx.segment_ids.astype(jnp.int32)
    if ctx.decode:
      y = self._decode(x_in, seg)
    else:
      sp = sequence_parallel(self)
      y, _ = self.forward_ssm(x_in, seg, segment_starts(seg), impl=self.scan, chunk=self.chunk, sequence=sp)
      if self.backward_ssm is not None:
        flip = lambda v: jnp.flip(v, axis=1)
        y_back, _ = self.backward_ssm(flip(x_in), flip(seg), segment_starts(flip(seg)), impl=self.scan,
                                      chunk=self.chunk, sequence=sp)
        y = y + flip(y_back)
    out = self.out_proj(y * jax.nn.silu(z))
    return jnp.where((seg != 0)[..., None], out, 0).astype(x_btd.dtype)

  def _decode(self, x_in_bte, seg_bt):
    if not self.spec.causal:
      raise ValueError("mamba with causal=False cannot decode incrementally; decoding needs causal=True")
    if getattr(self, "ssm_state", None) is None:
      raise ValueError("decode=True needs init_cache(batch, max_len, dtype) first")
    # Padding in a decode call (a right-padded prompt of a ragged batch) is transparent: it
    # neither updates the SSM state nor enters the conv state nor starts a segment, so a row's
    # next real token continues its own sequence as if the padding were not there (the cache
    # attention mixers mask padding slots to the same effect).
    seg_filled, reset = decode_resets(seg_bt, self.last_segment_id[...])
    impl = self.scan if seg_bt.shape[1] > 1 else "sequential"
    y, h_last = self.forward_ssm(x_in_bte, seg_bt, reset, impl=impl, chunk=self.chunk, h0_bes=self.ssm_state[...],
                                 context_bke=self.conv_state[...], context_segment_ids_bk=self.conv_segment_ids[...],
                                 hold_bt=seg_bt == 0)
    if self.d_conv > 1:
      self.conv_state[...], self.conv_segment_ids[...] = roll_conv_state(
          self.conv_state[...], self.conv_segment_ids[...], x_in_bte, seg_bt)
    self.ssm_state[...] = h_last
    self.last_segment_id[...] = seg_filled[:, -1]
    return y
