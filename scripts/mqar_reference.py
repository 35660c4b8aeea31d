"""A plain two-layer transformer in a page of JAX, trained on seqmix's MQAR data: a yardstick
for the learning curve of `model.mixer=attention` that shares no model or trainer code.

    python scripts/mqar_reference.py --vocab 512 --seq_len 64 --pairs 8 --steps 1500

Pre-RMSNorm blocks (causal softmax attention with RoPE, GELU MLP), untied output head, AdamW
(b2 0.98, weight decay 0.1, clip 1.0, 50 warmup steps then cosine to lr/10), batch 64 of
`trainer.data.mqar.MQAR` training examples in the trainer's order; held-out accuracy on 512
test examples every 100 steps. `configs/mqar.py` with the same task settings and its model
made alike (`--config.model.mixer_schedule= --config.model.tie_embeddings=false`: attention in
both layers, untied head) should follow the same curve (BENCHMARKS.md compares them).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trainer.data.mqar import MQAR  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--pairs", type=int, default=16)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--steps", type=int, default=1500)
  a = p.parse_args(argv)
  task = MQAR(a.seq_len, 0, vocab_size=a.vocab, num_pairs=a.pairs)
  d, nh, t = a.d_model, a.heads, a.seq_len
  hd = d // nh
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
  normal = lambda shape, scale: jax.random.normal(next(keys), shape) * scale
  params = {"emb": normal((a.vocab, d), 1.0), "out": normal((d, a.vocab), d ** -0.5)}
  for i in range(2):
    params[f"qkv{i}"], params[f"o{i}"] = normal((d, 3 * d), d ** -0.5), normal((d, d), d ** -0.5)
    params[f"up{i}"], params[f"down{i}"] = normal((d, 4 * d), d ** -0.5), normal((4 * d, d), (4 * d) ** -0.5)
  angle = jnp.arange(t)[:, None] * 10000.0 ** (-jnp.arange(0, hd, 2) / hd)
  cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]

  def rope(z):
    z1, z2 = z[..., ::2], z[..., 1::2]
    return jnp.stack([z1 * cos - z2 * sin, z1 * sin + z2 * cos], -1).reshape(z.shape)

  rms = lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)

  def logits(params, ids):
    x = params["emb"][ids]
    causal = jnp.tril(jnp.ones((t, t), bool))
    for i in range(2):
      q, k, v = jnp.split((rms(x) @ params[f"qkv{i}"]).reshape(*ids.shape, 3, nh, hd), 3, axis=2)
      q, k, v = rope(q[:, :, 0]), rope(k[:, :, 0]), v[:, :, 0]
      s = jnp.where(causal, jnp.einsum("bqhd,bkhd->bhqk", q, k) / hd ** 0.5, -1e30)
      x = x + jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(x.shape) @ params[f"o{i}"]
      x = x + jax.nn.gelu(rms(x) @ params[f"up{i}"]) @ params[f"down{i}"]
    return rms(x) @ params["out"]

  def loss(params, batch):
    lg = logits(params, batch["inputs"])
    nll = optax.softmax_cross_entropy_with_integer_labels(lg, batch["targets"])
    w = batch["weights"]
    return (nll * w).sum() / w.sum(), ((lg.argmax(-1) == batch["targets"]) * w).sum() / w.sum()

  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, a.lr, 50, a.steps, a.lr / 10), b2=0.98, weight_decay=0.1))
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    (value, acc), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value, acc

  def batch(split, first, n):
    ex = [task.example(split, i) for i in range(first, first + n)]
    return {k: jnp.asarray(np.stack([e[k] for e in ex])) for k in ("inputs", "targets", "weights")}

  held_out = batch("test", 0, 512)
  evaluate = jax.jit(loss)
  for s in range(a.steps):
    params, state, value, acc = step(params, state, batch("train", s * 64, 64))
    if (s + 1) % 100 == 0:
      el, ea = evaluate(params, held_out)
      print(f"step {s + 1}: train loss {float(value):.3f} acc {float(acc):.3f}, held-out loss {float(el):.3f} "
            f"acc {float(ea):.4f}", flush=True)


if __name__ == "__main__":
  main()
