"""TransNormer (docs/papers.md#transnormer): NormAttention and DiagAttention against plainly written
references (forward and gradients, causal and bidirectional, padding and packed segments,
lengths that are not multiples of the chunk/block), the recurrent == masked-quadratic
identity, SRMS scale invariance, DiagAttention's locality and its w >= T limit (exact
softmax attention), decode == full forward, the layer plan, errors, and sequence parallelism."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from layers.attention.exact import Attention, rope
from layers.linear.core import recurrent_linear_attention, reference_linear_attention
from layers.linear.transnormer import (DiagAttention, NormAttention, TransNormer, diag_attention,
                                       reference_diag_attention)
from layers.mixer_base import MixContext, MixerSpec, use_sequence_parallel
from parallel import mesh as mesh_lib
from parallel.sequence import SequenceParallel

from helpers import assert_close, check_values_and_grads, decode_in_pieces, decode_stepper

B, T, D, N = 2, 13, 16, 2
H = D // N


def make_spec(causal, *, layer_index=0, num_layers=2, positions="none", heads=N, d=D, **options):
  return MixerSpec(d_model=d, num_heads=heads, num_kv_heads=heads, causal=causal, positions=positions,
                   layer_index=layer_index, num_layers=num_layers, max_len=64, options=tuple(sorted(options.items())))


def segments(t=T):
  # Row 0: two packed segments then padding; row 1: one segment, no padding.
  a = [1] * 5 + [2] * (t - 7) + [0] * 2
  return np.array([a, [1] * t], np.int32)


def positions_of(seg):
  pos = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for i in range(1, seg.shape[1]):
      pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
  return pos


def inputs(seed=0, t=T, d=D):
  x = np.random.default_rng(seed).normal(size=(B, t, d)).astype(np.float32)
  seg = segments(t)
  return x, seg, positions_of(seg)


def ctx_of(seg, pos, **kw):
  return MixContext(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), **kw)


@jax.jit(static_argnums=0)
def _apply(graphdef, state, x, seg, pos):
  return nnx.merge(graphdef, state)(x, ctx_of(seg, pos))


def apply(layer, x, seg, pos):
  """layer(x) under jit (eager dispatch of the scans costs more than compiling), cached per graph."""
  graphdef, state = nnx.split(layer)
  return np.asarray(_apply(graphdef, state, jnp.asarray(x), jnp.asarray(seg), jnp.asarray(pos)))


def params_of(layer):
  return {name: getattr(layer, name).kernel[...] for name in ("query", "key", "value", "out")}


def layer_fn(layer, seg, pos):
  """(params dict, x) -> layer output, through the module's own code."""
  graphdef, state = nnx.split(layer)

  def f(params, x):
    m = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))  # fresh variables inside this trace
    inner = m.attention if isinstance(m, TransNormer) else m
    for name, w in params.items():
      getattr(inner, name).kernel[...] = w
    return m(x, ctx_of(seg, pos))

  return f


def srms(o_btnh, valid_bt):
  """x / (|x|_2 / sqrt(D) + 1e-8) over the concatenated heads; padding rows 0.

  A row that is exactly 0 (e.g. every ReLU score negative) has |x| = 0 without a NaN
  gradient: its derivative is then I / 1e-8, the limit of the formula.
  """
  ms = jnp.mean(jnp.square(o_btnh), axis=(-2, -1), keepdims=True)
  nonzero = ms > 0
  rms = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, ms, 1.0)), 0.0)
  return jnp.where(valid_bt[:, :, None, None], o_btnh / (rms + 1e-8), 0.0)


def project(params, x):
  q = jnp.einsum("btd,dnh->btnh", x, params["query"])
  k = jnp.einsum("btd,dnh->btnh", x, params["key"])
  v = jnp.einsum("btd,dnh->btnh", x, params["value"])
  return q, k, v


def visible(seg, causal, block=None, pos=None):
  """[B, T, T]: i sees j (same nonzero segment, j <= i if causal, same chunk floor(pos / block) if given)."""
  t = seg.shape[1]
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  if causal:
    m &= (j <= i)[None]
  if block:
    m &= pos[:, :, None] // block == pos[:, None, :] // block
  return jnp.asarray(m)


PHI = {"1+elu": lambda x: jax.nn.elu(x) + 1.0, "elu": jax.nn.elu}


def reference_norm_layer(params, x, seg, causal, kernel):
  """Quadratic NormAttention: (phi(Q) phi(K)^T * M) V, SRMS, output projection."""
  q, k, v = project(params, x)
  a = jnp.einsum("binh,bjnh->bnij", PHI[kernel](q), PHI[kernel](k)) * visible(seg, causal)[:, None]
  o = jnp.einsum("bnij,bjnh->binh", a, v)
  return jnp.einsum("btnh,nhd->btd", srms(o, jnp.asarray(seg != 0)), params["out"])


def reference_diag_layer(params, x, seg, pos, causal, kind, block, positions="none"):
  """Dense DiagAttention: scores over the explicit [T, T] block-diagonal mask."""
  q, k, v = project(params, x)
  if positions == "rope":
    q, k = rope(q, jnp.asarray(pos)), rope(k, jnp.asarray(pos))
  m = visible(seg, causal, block, pos)[:, None]
  s = jnp.einsum("binh,bjnh->bnij", q, k) / math.sqrt(q.shape[-1])
  if kind == "softmax":
    s = jnp.where(m, s, -1e30)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)) * m
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  else:
    p = jax.nn.relu(s) * m
  o = jnp.einsum("bnij,bjnh->binh", p, v)
  if kind == "relu":
    o = srms(o, jnp.asarray(seg != 0))
  return jnp.einsum("btnh,nhd->btd", o, params["out"])


# -- NormAttention --------------------------------------------------------------------------------


def test_norm_recurrent_equals_masked_quadratic():
  """The causal scan, the one-token recurrence and the masked quadratic form agree (raw, unnormalised)."""
  r = np.random.default_rng(1)
  q, k = (PHI["1+elu"](jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)) for _ in range(2))
  v = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)
  seg = jnp.asarray(segments())
  quad = jax.jit(reference_linear_attention, static_argnames=("causal", "normalize"))(q, k, v, seg, causal=True,
                                                                                      normalize=False)
  recurrent = jax.jit(recurrent_linear_attention, static_argnames=("normalize",))
  rec = recurrent(q, k, v, seg, normalize=False)
  assert_close(rec, quad, 2e-5, "recurrent vs quadratic")
  assert np.abs(np.asarray(quad)).max() > 1.0


# "elu" is T1's plain ELU (negative features allowed): a 1+elu layer would fail the second case.
@pytest.mark.parametrize("causal,kernel", [(True, "1+elu"), (False, "elu")])
def test_norm_layer_matches_reference(causal, kernel):
  x, seg, pos = inputs()
  layer = TransNormer(make_spec(causal, layer_index=1, chunk=4, kernel=kernel), rngs=nnx.Rngs(0))
  assert isinstance(layer.attention, NormAttention)
  params = params_of(layer.attention)
  check_values_and_grads(layer_fn(layer, seg, pos), lambda p, x: reference_norm_layer(p, x, seg, causal, kernel),
                         params, jnp.asarray(x))


@pytest.mark.parametrize("which", ["norm", "diag-relu", "diag-softmax"])
def test_srms_scale_invariance(which):
  """Positive rescaling of V leaves SRMS-normalised outputs unchanged (not the softmax Diag, which has no norm)."""
  x, seg, pos = inputs()
  if which == "norm":
    layer = NormAttention(make_spec(False, chunk=4), rngs=nnx.Rngs(0))
  else:
    layer = DiagAttention(make_spec(False, block=4, diag=which.split("-")[1]), rngs=nnx.Rngs(0))
  before = apply(layer, x, seg, pos)
  layer.value.kernel[...] = layer.value.kernel[...] * 3.7
  after = apply(layer, x, seg, pos)
  if which == "diag-softmax":
    np.testing.assert_allclose(after, 3.7 * before, rtol=1e-4, atol=1e-5)
  else:
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
    assert np.abs(before).max() > 1e-2


# -- DiagAttention --------------------------------------------------------------------------------


def naive_diag(q, k, v, seg, pos, block, causal, kind):
  """Per (row, head, query) loop over the visible keys of its chunk (numpy, float64)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for i in range(q.shape[1]):
      if seg[b, i] == 0:
        continue
      js = [j for j in range(q.shape[1]) if seg[b, j] == seg[b, i] and pos[b, j] // block == pos[b, i] // block
            and (not causal or j <= i)]
      for n in range(q.shape[2]):
        s = np.array([q[b, i, n] @ k[b, j, n] for j in js]) / math.sqrt(q.shape[-1])
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum() if kind == "softmax" else np.maximum(s, 0)
        out[b, i, n] = sum(pj * v[b, j, n] for pj, j in zip(p, js))
  return out


@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_diag_function_matches_loop_and_dense_twin(causal, kind):
  """Row 0's second segment starts at stored token 5: its chunks straddle the stored blocks."""
  r = np.random.default_rng(2)
  q, k, v = (r.normal(size=(B, T, N, H)).astype(np.float32) for _ in range(3))
  seg = segments()
  pos = positions_of(seg)
  kw = dict(block=4, causal=causal, kind=kind)
  got = jax.jit(lambda *a: diag_attention(*a, **kw))(q, k, v, jnp.asarray(seg), jnp.asarray(pos))
  want = naive_diag(q, k, v, seg, pos, 4, causal, kind)
  assert_close(got, want, 2e-5, "blocks vs loop")
  assert_close(jax.jit(lambda *a: reference_diag_attention(*a, **kw))(q, k, v, jnp.asarray(seg), jnp.asarray(pos)),
               want, 2e-5, "dense twin vs loop")
  assert np.all(np.asarray(got)[seg == 0] == 0)


# Bidirectional softmax is also checked against exact attention (test_wide_diag_equals_softmax_attention).
@pytest.mark.parametrize("kind,causal,positions", [("softmax", True, "rope"), ("relu", True, "none"),
                                                    ("relu", False, "rope")])
def test_diag_layer_matches_reference(kind, causal, positions):
  x, seg, pos = inputs()
  layer = TransNormer(make_spec(causal, positions=positions, block=4, diag=kind), rngs=nnx.Rngs(0))
  assert isinstance(layer.attention, DiagAttention)
  params = params_of(layer.attention)
  check_values_and_grads(layer_fn(layer, seg, pos),
                         lambda p, x: reference_diag_layer(p, x, seg, pos, causal, kind, 4, positions),
                         params, jnp.asarray(x))


@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_diag_locality(causal, kind):
  """Perturbing a token in chunk c changes chunk c (at or after it, if causal) and nothing else."""
  x, _, pos = inputs()
  seg = np.ones((B, T), np.int32)
  pos = positions_of(seg)
  layer = DiagAttention(make_spec(causal, block=4, diag=kind), rngs=nnx.Rngs(0))
  f = jax.jit(lambda x: layer(x, ctx_of(seg, pos)))
  x2 = x.copy()
  x2[:, 5] += 3.0  # token 5: chunk 1 = tokens 4..7
  delta = np.abs(np.asarray(f(jnp.asarray(x2))) - np.asarray(f(jnp.asarray(x)))).max(axis=(0, 2))
  changed = np.arange(5 if causal else 4, 8)
  assert np.all(delta[changed] > 1e-4), delta
  assert np.all(np.delete(delta, changed) == 0.0), delta


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_packed_example_equals_example_alone(causal):
  """Chunks restart with every segment: an example packed after another one (at stored token 5)
  gives the outputs it gives alone."""
  x, _, _ = inputs()
  seg = np.array([[1] * 5 + [2] * 8, [1] * 8 + [0] * 5], np.int32)
  layer = DiagAttention(make_spec(causal, positions="rope", block=4), rngs=nnx.Rngs(0))
  packed = apply(layer, x, seg, positions_of(seg))
  alone_x = np.concatenate([x[:1, 5:], x[:1, :5]], axis=1)  # the second example first, then padding
  alone_seg = np.array([[1] * 8 + [0] * 5], np.int32)
  alone = apply(layer, np.concatenate([alone_x, x[1:]]), np.concatenate([alone_seg, seg[1:]]),
                positions_of(np.concatenate([alone_seg, seg[1:]])))
  assert_close(packed[0, 5:], alone[0, :8], 2e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_wide_diag_equals_softmax_attention(causal):
  """T2-Diag with w >= T (w = 16, T = 13: padding inside the one block) is exact softmax attention."""
  x, seg, pos = inputs()
  spec = make_spec(causal, positions="rope", block=16)
  diag = DiagAttention(spec, rngs=nnx.Rngs(0))
  exact = Attention(spec, rngs=nnx.Rngs(1))
  for name, w in params_of(diag).items():
    getattr(exact, name).kernel[...] = w
  assert_close(apply(diag, x, seg, pos), apply(exact, x, seg, pos), 2e-5)


# -- decoding -------------------------------------------------------------------------------------


DECODE_CASES = [(0, "softmax"), (0, "relu"), (1, "softmax")]  # layer 0: Diag; layer 1: Norm


@pytest.mark.parametrize("layer_index,kind", DECODE_CASES, ids=["diag-softmax", "diag-relu", "norm"])
def test_decode_equals_full_forward(layer_index, kind):
  """Prefill 6 tokens, a 3-token call (crossing a block boundary mid-block), then one token at a time."""
  x, _, _ = inputs()
  # Row 0: packed segments (the second starts mid-block); row 1: a right-padded prompt whose
  # sequence continues after the padding (positions go on from 4).
  seg = np.array([[1] * 5 + [2] * 8, [1] * 4 + [0] * 2 + [1] * 7], np.int32)
  pos = positions_of(seg)
  pos[1] = [0, 1, 2, 3, 0, 0] + list(range(4, 11))
  layer = TransNormer(make_spec(True, layer_index=layer_index, positions="rope", block=4, chunk=4, diag=kind),
                      rngs=nnx.Rngs(0))
  full = apply(layer, x, seg, pos)
  layer.init_cache(B, T, jnp.float32)
  got = decode_in_pieces(layer, x, seg, pos, [0, 6, 9] + list(range(10, T + 1)))
  valid = seg != 0
  assert_close(got[valid], full[valid], 2e-5, "decode vs full")


def test_ragged_prompts_decode_like_each_row_alone(kind="softmax"):
  """Prompts of 3 and 6 tokens right-padded into one prefill, then 5 shared steps: each row
  matches the full forward of its own sequence (the 3 padding slots leave no gap in the chunks)."""
  lens, width, steps = [3, 6], 6, 5
  x = np.random.default_rng(4).normal(size=(B, width + steps, D)).astype(np.float32)
  layer = TransNormer(make_spec(True, positions="rope", block=4, diag=kind), rngs=nnx.Rngs(0))
  own = np.zeros((B, width + steps), np.int32)
  for b, n in enumerate(lens):
    own[b, :n + steps] = 1
  # Row b's own sequence: its prompt then its continuation, contiguous.
  seq = np.stack([np.concatenate([x[b, :n], x[b, width:], x[b, n:width]]) for b, n in enumerate(lens)])
  fulls = apply(layer, seq, own, np.broadcast_to(np.arange(width + steps), own.shape))
  layer.init_cache(B, width + steps, jnp.float32)
  state, step = decode_stepper(layer)
  seg = np.zeros((B, width), np.int32)
  for b, n in enumerate(lens):
    seg[b, :n] = 1
  state, pre = step(state, jnp.asarray(x[:, :width]), jnp.asarray(seg), jnp.broadcast_to(jnp.arange(width), (B, width)))
  for b, n in enumerate(lens):
    assert_close(np.asarray(pre)[b, :n], fulls[b, :n], 2e-5, "prefill")
  for i in range(steps):
    pos = np.array([[n + i] for n in lens], np.int32)
    state, y = step(state, jnp.asarray(x[:, width + i:width + i + 1]), jnp.ones((B, 1), jnp.int32), jnp.asarray(pos))
    for b, n in enumerate(lens):
      assert_close(np.asarray(y)[b, 0], fulls[b, n + i], 2e-5, f"step {i}")


def test_decode_needs_causal_and_cache():
  layer = TransNormer(make_spec(False, block=4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="decodes only causally"):
    layer.init_cache(B, T, jnp.float32)
  layer = TransNormer(make_spec(True, block=4), rngs=nnx.Rngs(0))
  x, seg, pos = inputs()
  with pytest.raises(ValueError, match="init_cache"):
    layer(jnp.asarray(x), ctx_of(seg, pos, decode=True))


# -- plan, options, errors ------------------------------------------------------------------------


def test_layer_plan():
  kinds = lambda **o: [type(TransNormer(make_spec(True, layer_index=i, num_layers=4, **o), rngs=nnx.Rngs(0))
                            .attention).__name__[:4] for i in range(4)]
  assert kinds() == ["Diag", "Diag", "Norm", "Norm"]  # local attention in the early half
  assert kinds(diag_layers=0) == ["Norm"] * 4
  assert kinds(diag_layers=1) == ["Diag", "Norm", "Norm", "Norm"]
  assert kinds(diag_layers=4) == ["Diag"] * 4


@pytest.mark.parametrize("options,match", [
    (dict(kernel="relu"), "model.transnormer.kernel='relu'"),
    (dict(diag="linear"), "model.transnormer.diag='linear'"),
    (dict(block=0), "model.transnormer.block=0"),
    (dict(diag_layers=-2), "model.transnormer.diag_layers=-2"),
])
def test_bad_options(options, match):
  with pytest.raises(ValueError, match=match):
    for i in range(2):
      TransNormer(make_spec(True, layer_index=i, **options), rngs=nnx.Rngs(0))


def test_grouped_kv_heads_rejected():
  spec = MixerSpec(d_model=D, num_heads=2, num_kv_heads=1, causal=True, positions="none", layer_index=0,
                   num_layers=2, max_len=64)
  with pytest.raises(ValueError, match="num_kv_heads == model.num_heads"):
    TransNormer(spec, rngs=nnx.Rngs(0))


def test_permuted_layout_rejected():
  x, seg, pos = inputs()
  layer = TransNormer(make_spec(True, block=4), rngs=nnx.Rngs(0))
  idx = jnp.broadcast_to(jnp.arange(T)[::-1], (B, T))
  with pytest.raises(ValueError, match="permuted row"):
    layer(jnp.asarray(x), ctx_of(seg, pos, index=idx))


# -- sequence parallelism -------------------------------------------------------------------------

RULES = (("batch", ("data", "fsdp")), ("length", "sequence"), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("head_dim", None))


@pytest.mark.parametrize("strategy", ["scan", "all_to_all"])
def test_sequence_parallel_equals_single_device(strategy):
  """Both kinds of layer on 8 fake devices (length sharded 8 ways) equal the single-device forward."""
  mesh = mesh_lib.make_mesh(ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=8)))
  sp = SequenceParallel(mesh, RULES, strategy)
  t, d, heads = 64, 16, 8
  x = np.random.default_rng(3).normal(size=(1, t, d)).astype(np.float32)
  seg = np.ones((1, t), np.int32)
  seg[0, 21:] = 2
  seg[0, 60:] = 0
  pos = positions_of(seg)
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "sequence")))
  # NormAttention's sequence-parallel paths are KernelAttention's; its "scan" path is the one with state.
  for layer_index in ((0, 1) if strategy == "scan" else (0,)):
    layer = TransNormer(make_spec(True, layer_index=layer_index, heads=heads, d=d, block=8, chunk=4, diag="relu"),
                        rngs=nnx.Rngs(0))
    want = apply(layer, x, seg, pos)
    graphdef, state = nnx.split(layer)

    def f(x, seg, pos):
      with use_sequence_parallel(sp), mesh_lib.activation_sharding(mesh, RULES):
        return nnx.merge(graphdef, state)(x, ctx_of(seg, pos))

    compiled = jax.jit(f).lower(put(x), put(seg), put(pos)).compile()
    got = np.asarray(compiled(put(x), put(seg), put(pos)))
    assert_close(got, want, 2e-5, f"layer {layer_index}")
    if strategy == "scan" and layer_index == 0:
      # Devices hold whole blocks (64 / 8 = 8 = w): the diagonal layer exchanges one block
      # with its neighbour and never gathers the length.
      hlo = compiled.as_text()
      assert "collective-permute" in hlo
      for op in ("all-gather", "all-to-all"):
        assert op not in hlo, op
