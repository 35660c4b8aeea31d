"""Compiled memory and CPU step time of every softmax-family mixer (one layer, forward+backward).

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python scripts/bench_attention.py [--lengths 1024,4096,16384]

For each registered mixer and length T: temporaries of the compiled forward+backward
(`memory_analysis()`, exact and deterministic) and the median wall time of a few steps
on this machine's CPU (skipped where it would take too long: dense at T >= 16k). One
layer with its projections, x [1, T, 128], 4 heads, causal (linformer: bidirectional),
each mixer's default settings from configs/base.py (`model.<mixer>.*`).
`--mixers linear` measures the linear / state-space family.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from layers.functional import FunctionalModel  # noqa: E402
from layers.mixers import MIXERS, MixContext, MixerSpec  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.experiment import mixer_options  # noqa: E402

SOFTMAX_FAMILY = ("attention", "flash", "local", "bigbird", "block_sparse", "xattention", "sparse_transformer",
                  "longformer", "combiner", "swin")
LINEAR_FAMILY = ("linear", "performer", "transnormer", "sla", "ecoformer", "mamba", "mamba2", "lmu", "linformer", "reformer",
                 "sinkhorn", "synthesizer")


def measure(name: str, t: int, d: int = 128, heads: int = 4, time_it: bool = True, causal: bool = True):
  cfg = load_config("configs/default.py", [f"model.mixer={name}"])
  options = dict(mixer_options(cfg)).get(name, ())
  # layer_index 1 of 2: transnormer's second half (NormAttention, its linear layer)
  spec = MixerSpec(d_model=d, num_heads=heads, num_kv_heads=heads, causal=causal, positions="rope", layer_index=1,
                   num_layers=2, max_len=t, options=options)
  fm = FunctionalModel(MIXERS[name](spec, rngs=nnx.Rngs(params=0)))
  params, extra = fm.init_params(), fm.init_extra()  # extra: e.g. BatchNorm statistics, hash state
  seg = jnp.ones((1, t), jnp.int32)
  pos = jnp.arange(t, dtype=jnp.int32)[None]

  def loss(params, x):
    module = fm.module(params, extra)
    return jnp.sum(module(x, MixContext(segment_ids=seg, positions=pos)) ** 2)

  x = jax.random.normal(jax.random.key(0), (1, t, d), jnp.float32)
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled = step.lower(params, x).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  ms = None
  if time_it:
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, x))
      times.append(time.perf_counter() - t0)
    ms = 1000 * float(np.median(times))
  return temp, ms


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="1024,4096,16384")
  parser.add_argument("--mixers", default=",".join(SOFTMAX_FAMILY),
                      help="comma-separated names, or 'softmax' / 'linear' for a family")
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  print("| mixer | " + " | ".join(f"T={t} temp MiB | T={t} ms" for t in lengths) + " |")
  print("|---|" + "---|---|" * len(lengths))
  names = {"softmax": SOFTMAX_FAMILY, "linear": LINEAR_FAMILY}.get(args.mixers, args.mixers.split(","))
  for name in names:
    cells = []
    # bidirectional-only mixers (linformer) are measured bidirectional
    causal = name != "linformer"
    for t in lengths:
      try:
        temp, ms = measure(name, t, time_it=not (name == "attention" and t >= 16384), causal=causal)
        cells += [f"{temp / 2**20:,.1f}", "-" if ms is None else f"{ms:,.0f}"]
      except Exception as e:  # one mixer's failure must not hide the others
        cells += [f"error: {type(e).__name__}", "-"]
    print(f"| {name}{'' if causal else ' (bidirectional)'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
