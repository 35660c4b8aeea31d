"""Shared test helpers: run the entry points in-process or as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A seconds-long run on 8 fake devices: data-parallel over all 8 by default.
TINY = ["--config=configs/default.py:smoke", "--config.batch_size=8", "--config.progress_bar=false"]


def train(workdir, *extra) -> int:
  from trainer import train as train_mod
  return train_mod.main([*TINY, f"--workdir={workdir}", *extra])


def evaluate(workdir, *extra) -> int:
  from trainer import evaluate as eval_mod
  return eval_mod.main([*TINY, f"--workdir={workdir}", *extra])


def run_cli(module: str, *args, timeout=300, env_extra=None) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir) -> dict[int, float]:
  return {m["step"]: m["train/loss"] for m in metrics(workdir) if "train/loss" in m}


def assert_close(got, want, tol, what=""):
  got, want = np.asarray(got), np.asarray(want)
  err = np.abs(got - want)
  assert np.all(np.isfinite(got)), what
  assert err.max() < tol, f"{what} max err {err.max():.2e} mean {err.mean():.2e}"


def check_values_and_grads(f_layer, f_ref, params, x, tol=2e-5, gtol=5e-5, every_param_used=False):
  """Outputs and the gradients (params and x) of sum(out * w), one compiled program per side."""
  import jax
  import jax.numpy as jnp
  w = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)

  def value_and_grads(f, params, x):
    y, vjp = jax.vjp(f, params, x)
    return y, vjp(jnp.asarray(w))

  y_got, g_got = jax.jit(value_and_grads, static_argnums=0)(f_layer, params, x)
  y_want, g_want = jax.jit(value_and_grads, static_argnums=0)(f_ref, params, x)
  assert_close(y_got, y_want, tol, "forward")
  for name in params:
    assert_close(g_got[0][name], g_want[0][name], gtol, f"d{name}")
    if every_param_used:
      assert np.abs(np.asarray(g_want[0][name])).max() > 0, name
  assert_close(g_got[1], g_want[1], gtol, "dx")


def values_and_grads(fn, q, k, v, w, w_lse=None):
  """fn(q, k, v) and the gradients of sum(out * w), from one jit (one interpret-mode compile).

  When fn returns (out, lse), pass `w_lse` too: the loss adds sum(lse * w_lse) over the
  finite entries (what a merge of partial results backpropagates), and the value is (out, lse).
  """
  import jax
  import jax.numpy as jnp

  def loss(q, k, v):
    res = fn(q, k, v)
    if w_lse is None:
      return jnp.sum(res.astype(jnp.float32) * w), res
    o, lse = res
    return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse), res

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def zigzag_index(b, t, n_chunks, seed):
  """True positions of a zigzag-stored row (chunk i and 2n-1-i together), shifted per row."""
  c = t // (2 * n_chunks)
  order = np.concatenate([np.r_[np.arange(i * c, (i + 1) * c), np.arange((2 * n_chunks - 1 - i) * c,
                                                                          (2 * n_chunks - i) * c)]
                          for i in range(n_chunks)])
  shift = np.random.default_rng(seed).integers(0, 5, size=(b, 1))
  return (order[None, :] + shift).astype(np.int32)


def decode_stepper(layer):
  """(state, step) for incremental decoding of a mixer whose cache is initialised:
  step(state, x, seg, pos) -> (state, y), jitted, with a decode=True context."""
  import jax
  from flax import nnx

  from layers.mixer_base import MixContext
  graphdef, state = nnx.split(layer)

  @jax.jit
  def step(state, x, seg, pos):
    m = nnx.merge(graphdef, state)
    y = m(x, MixContext(segment_ids=seg, positions=pos, decode=True))
    return nnx.split(m)[1], y

  return state, step


def decode_in_pieces(layer, x, seg, pos, cuts):
  """The layer's outputs when [B, T] inputs arrive as the calls x[:, cuts[i]:cuts[i+1]]."""
  import jax.numpy as jnp
  state, step = decode_stepper(layer)
  outs = []
  for a, b in zip(cuts[:-1], cuts[1:]):
    state, y = step(state, jnp.asarray(x[:, a:b]), jnp.asarray(seg[:, a:b]), jnp.asarray(pos[:, a:b]))
    outs.append(np.asarray(y))
  return np.concatenate(outs, axis=1)


def attention_mixer_results(impls, *, d, num_heads, num_kv_heads, causal, dtype):
  """{(impl, order): (loss, d loss / d x)} of the `attention` mixer under each model.attention_impl
  in `impls`, on one batch (B=2, T=40) with packed segments and padding, for order "storage" and
  "permuted" (rows stored in another order, ctx.index = their true positions). RoPE positions;
  the same weights for every impl."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from layers.attention.exact import Attention
  from layers.mixer_base import MixContext, MixerSpec
  b, t = 2, 40
  r = np.random.default_rng(5)
  x = jnp.asarray(r.normal(size=(b, t, d)), dtype)
  w = jnp.asarray(r.normal(size=(b, t, d)), jnp.float32)
  seg = np.ones((b, t), np.int32)
  seg[0, 15:] = 2
  seg[0, 36:] = 0
  seg[1, 31:] = 0
  perm = np.r_[np.arange(20, 40), np.arange(0, 20)][::-1].copy()  # any storage order of the true positions
  results = {}
  for impl in impls:
    spec = MixerSpec(d_model=d, num_heads=num_heads, num_kv_heads=num_kv_heads, causal=causal, positions="rope",
                     layer_index=0, num_layers=1, max_len=64, attention_impl=impl)
    mixer = Attention(spec, rngs=nnx.Rngs(0))
    for order in ("storage", "permuted"):
      index = None if order == "storage" else jnp.asarray(np.broadcast_to(perm, (b, t)), jnp.int32)
      pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)) if index is None else index
      ctx = MixContext(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos), index=index)
      f = lambda x, mixer=mixer, ctx=ctx: jnp.sum(mixer(x, ctx).astype(jnp.float32) * w)
      results[impl, order] = jax.jit(jax.value_and_grad(f))(x)
  return results
