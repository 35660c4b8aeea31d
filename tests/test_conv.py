"""The `conv` mixer (gated short convolution) against a per-token loop, decode, and the
`mixer` entry of `model.mixer_schedule`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from layers.mixer_base import MixContext, MixerSpec, use_sequence_parallel
from layers.ssm.conv import ShortConv
from trainer import config as config_lib

from helpers import assert_close, check_values_and_grads, decode_in_pieces

B, T, D = 2, 11, 8


def make_spec(causal, **options):
  return MixerSpec(d_model=D, num_heads=2, num_kv_heads=2, causal=causal, positions="none", layer_index=0,
                   num_layers=2, max_len=32, options=tuple(sorted(options.items())))


def inputs(seed=0):
  x = np.random.default_rng(seed).normal(size=(B, T, D)).astype(np.float32)
  # Row 0: two packed segments then padding; row 1: one segment.
  seg = np.array([[1] * 4 + [2] * 5 + [0] * 2, [1] * T], np.int32)
  pos = np.zeros_like(seg)
  for b in range(B):
    for i in range(1, T):
      pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
  return x, seg, pos


def ctx(seg, pos, **kw):
  return MixContext(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), **kw)


def reference(params, x, seg, *, causal, k, gated):
  """Token by token: y[b, t] = gate(x[b, t]) * (sum over taps s of w[s - t + left] x[b, s] + c),
  taps s in t-k+1..t (causal) or t-floor(k/2)..t+k-1-floor(k/2), same nonzero segment only."""
  left = k - 1 if causal else k // 2
  rows = []
  n_rows, length = seg.shape
  for b in range(n_rows):
    out = []
    for t in range(length):
      if seg[b, t] == 0:
        out.append(jnp.zeros(D))
        continue
      acc = params["conv_bias"]
      for s in range(length):
        j = s - t + left
        if 0 <= j < k and seg[b, s] == seg[b, t]:
          acc = acc + params["conv_weight"][j] * x[b, s]
      if gated:
        acc = acc * (x[b, t] @ params["gate"] + params["gate_bias"])
      out.append(acc)
    rows.append(jnp.stack(out))
  return jnp.stack(rows)


def params_of(layer):
  p = {"conv_weight": layer.conv_weight[...], "conv_bias": jnp.asarray(
      np.random.default_rng(3).normal(size=(D,)), jnp.float32)}
  if layer.gate is not None:
    p.update(gate=layer.gate.kernel[...], gate_bias=jnp.asarray(np.random.default_rng(4).normal(size=(D,)),
                                                                 jnp.float32))
  return p


def layer_fn(layer, seg, pos, sequence_parallel=None):
  graphdef, state = nnx.split(layer)

  def f(params, x):
    m = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
    m.conv_weight[...], m.conv_bias[...] = params["conv_weight"], params["conv_bias"]
    if m.gate is not None:
      m.gate.kernel[...], m.gate.bias[...] = params["gate"], params["gate_bias"]
    with use_sequence_parallel(sequence_parallel):
      return m(x, ctx(seg, pos))

  return f


@pytest.mark.parametrize("causal,k,gated", [(True, 3, True), (False, 3, True), (False, 4, False), (True, 1, True)])
def test_matches_the_per_token_loop(causal, k, gated):
  x, seg, pos = inputs()
  layer = ShortConv(make_spec(causal, kernel=k, gate=gated), rngs=nnx.Rngs(0))
  params = params_of(layer)
  check_values_and_grads(layer_fn(layer, seg, pos),
                         lambda p, x: reference(p, x, seg, causal=causal, k=k, gated=gated),
                         params, jnp.asarray(x), every_param_used=True)


@pytest.mark.parametrize("causal,k", [(True, 5), (False, 5), (False, 4)])
def test_halo_sequence_parallel_equals_the_loop(causal, k):
  """The length split over 4 devices (`parallel.sequence_strategy=halo`): each device gets the
  k - 1 (causal) or floor(k/2) / k-1-floor(k/2) (centred) tokens beside its 4-token chunk from its
  neighbours. Values and gradients equal the per-token loop, with a segment boundary and a
  padding run crossing chunk boundaries."""
  from parallel import mesh as mesh_lib
  from parallel.sequence import SequenceParallel
  mesh = mesh_lib.make_mesh(ConfigDict(dict(data=2, fsdp=1, tensor=1, sequence=4)))
  rules = (("batch", ("data", "fsdp")), ("length", "sequence"), ("embed", None))
  t = 16
  x = np.random.default_rng(6).normal(size=(B, t, D)).astype(np.float32)
  seg = np.array([[1] * 6 + [2] * 7 + [0] * 3, [3] * 9 + [0] * 2 + [4] * 5], np.int32)
  pos = np.zeros_like(seg)
  layer = ShortConv(make_spec(causal, kernel=k, gate=True), rngs=nnx.Rngs(1))
  params = params_of(layer)
  sp = SequenceParallel(mesh, rules, "halo")
  check_values_and_grads(layer_fn(layer, seg, pos, sp),
                         lambda p, x: reference(p, x, seg, causal=causal, k=k, gated=True),
                         params, jnp.asarray(x), every_param_used=True)


def test_halo_longer_than_a_chunk_is_refused():
  from parallel import mesh as mesh_lib
  from parallel.sequence import SequenceParallel
  mesh = mesh_lib.make_mesh(ConfigDict(dict(data=1, fsdp=1, tensor=1, sequence=8)))
  sp = SequenceParallel(mesh, (("length", "sequence"),), "halo")
  layer = ShortConv(make_spec(True, kernel=5), rngs=nnx.Rngs(1))
  x, seg, pos = np.zeros((1, 16, D), np.float32), np.ones((1, 16), np.int32), np.zeros((1, 16), np.int32)
  with pytest.raises(ValueError, match="halo of 4 tokens is longer than one device's 2 tokens"):
    layer_fn(layer, seg, pos, sp)(params_of(layer), jnp.asarray(x))


def test_decode_equals_full_forward():
  """Prefill 5 tokens, a 2-token call, then one token at a time; row 0's second packed example
  starts inside the prefill, and its padding tail never enters the kept history."""
  x, seg, pos = inputs(1)
  layer = ShortConv(make_spec(True, kernel=3), rngs=nnx.Rngs(2))
  layer.conv_bias[...] = jnp.asarray(np.random.default_rng(5).normal(size=(D,)), jnp.float32)
  full = np.asarray(layer(jnp.asarray(x), ctx(seg, pos)))
  layer.init_cache(B, T, jnp.float32)
  got = decode_in_pieces(layer, x, seg, pos, [0, 5, 7] + list(range(8, T + 1)))
  assert_close(got[seg != 0], full[seg != 0], 2e-5, "decode vs full")


def test_bad_kernel_and_bidirectional_decode_are_refused():
  with pytest.raises(ValueError, match="model.conv.kernel=0"):
    ShortConv(make_spec(True, kernel=0), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="causal"):
    ShortConv(make_spec(False), rngs=nnx.Rngs(0)).init_cache(1, 8, jnp.float32)


def test_schedule_entry_mixer_stands_for_model_mixer():
  from configs import base
  c = base.get_config()
  c.model.num_layers, c.model.mixer, c.model.mixer_schedule = 4, "linear", "conv,mixer"
  assert config_lib.mixer_schedule(c) == ["conv", "linear", "conv", "linear"]
  config_lib.validate(c)
  c.model.mixer = "nope"
  with pytest.raises(config_lib.UserError, match=r"model.mixer_schedule\[1\]='nope'"):
    config_lib.validate(c)
