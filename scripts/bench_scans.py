"""Mamba's selective scan, every implementation: step time and compiled memory, forward and gradient.

    python scripts/bench_scans.py [--batch 64 --length 256 --inner 256 --state 16 --chunks 16,64]

Times `layers.ssm.mamba.selective_scan` alone (no projections) on this machine's default
backend: the median of a few calls of the jitted forward and of the jitted gradient with
respect to every input, and the compiled temporaries of each (`memory_analysis()`, exact).
Rows: `sequential` (a token loop), `associative`, and `chunked` at each chunk length with each
algorithm inside a chunk (`associative` / `sequential`; `auto` picks the second on CPU and the
first on accelerators). The defaults are the MQAR model's shape (B=64, T=256, E=2*128, S=16).
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

from layers.ssm.mamba import selective_scan  # noqa: E402


def _median_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1000 * float(np.median(times))


def measure(impl: str, chunk: int, inner: str, args, repeats: int):
  fwd = lambda *v: selective_scan(*v, impl=impl, chunk=chunk, inner=inner)[0]
  loss = lambda *v: jnp.sum(fwd(*v) ** 2)
  out = []
  for f in (fwd, jax.grad(loss, argnums=(0, 1, 2, 3, 4))):
    compiled = jax.jit(f).lower(*args).compile()
    out.append((_median_ms(compiled, args, repeats), compiled.memory_analysis().temp_size_in_bytes / 2 ** 20))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--inner", type=int, default=256, help="E: channels (expand * d_model)")
  p.add_argument("--state", type=int, default=16, help="S: state size per channel")
  p.add_argument("--chunks", default="16,64", help="chunk lengths for the chunked scan")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  b, t, e, s = args.batch, args.length, args.inner, args.state
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (b, t, e), jnp.float32)
  delta = jax.nn.softplus(jax.random.normal(keys[1], (b, t, e), jnp.float32) - 3)
  a = -jnp.broadcast_to(jnp.arange(1, s + 1, dtype=jnp.float32), (e, s))
  bb = jax.random.normal(keys[3], (b, t, s), jnp.float32)
  cc = jax.random.normal(keys[4], (b, t, s), jnp.float32)
  inputs = (x, delta, a, bb, cc)
  rows = [("sequential", 0, "auto"), ("associative", 0, "auto")]
  for chunk in (int(c) for c in args.chunks.split(",")):
    rows += [("chunked", chunk, "associative"), ("chunked", chunk, "sequential")]
  print(f"selective_scan on {jax.devices()[0].device_kind} (jax {jax.__version__}): B={b}, T={t}, E={e}, S={s}")
  print()
  print("| scan | forward ms | gradient ms | forward temp MiB | gradient temp MiB |")
  print("|---|---|---|---|---|")
  for impl, chunk, inner in rows:
    (f_ms, f_mib), (g_ms, g_mib) = measure(impl, chunk, inner, inputs, args.repeats)
    name = impl if impl != "chunked" else f"chunked {chunk}, {inner} inside"
    print(f"| {name} | {f_ms:.1f} | {g_ms:.1f} | {f_mib:,.1f} | {g_mib:,.1f} |", flush=True)


if __name__ == "__main__":
  main()
