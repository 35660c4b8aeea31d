"""Attention kernel benchmark: our Pallas flash kernels vs cuDNN, XLA and JAX's reference Pallas kernel.

    python scripts/bench_kernels.py [--out DIR] [--budget_s 240]     # on a GPU (about 2-4 minutes)
    python scripts/bench_kernels.py --cpu_smoke                      # script check on CPU (interpret mode)

For T in {1k, 2k, 4k, 8k, 16k}, head dim {64, 128}, causal and not, bf16, B*T = 16k tokens and
N = 16 heads: forward and forward+backward TFLOP/s of each implementation and our ratio to
cuDNN. Then causal block-sparse attention (a local and a random block table, T in {4k, 16k}):
our Pallas block-sparse kernel vs the pure-JAX engine vs the dense kernel. FLOPs: forward 4*B*N*T*T*H (half when causal), backward 2.5x forward, so
forward+backward is 3.5x. Each measurement is guarded (a failure prints `err` and the table
goes on); XLA's dense path is skipped above --xla_max_t (it materialises [B, N, T, T] fp32
scores); rows past --budget_s are skipped. Then a short sweep of our tile sizes at one shape,
so the next GPU session can retune `kernels.flash_pallas.default_tiling`. Before all that:
split-KV decode (1 new token against caches of 8k-128k, B=4, N=32, K=8, H=128) as achieved
K/V read bandwidth and its fraction of a measured device-to-device copy. Off a GPU it prints
a line and exits 0 (unless --cpu_smoke).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels.block_sparse_pallas import block_sparse_attention_pallas  # noqa: E402
from kernels.decode_pallas import decode_attention_pallas  # noqa: E402
from kernels.flash_pallas import Tiling, default_tiling, flash_attention_pallas, mgpu_tiling  # noqa: E402


TABLES = ("decode", "flash", "sparse", "sweep")


def attention_flops(b: int, n: int, t: int, h: int, causal: bool, backward: bool) -> float:
  fwd = 4.0 * b * n * t * t * h * (0.5 if causal else 1.0)
  return fwd * 3.5 if backward else fwd


def _median_time(fn, args, target_s: float = 0.03, repeats: int = 3) -> float:
  """Seconds per call: compile and warm up, then the median of `repeats` timed batches."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - t0
  n = max(1, min(100, int(target_s / max(once, 1e-6))))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / n)
  return statistics.median(times)


def _implementations(causal: bool, h: int, interpret: bool, tiling: Tiling | None = None):
  """name -> f(q, k, v) -> out, each [B, T, N, H]."""
  scale = 1.0 / math.sqrt(h)
  impls = {
      "ours": lambda q, k, v: flash_attention_pallas(q, k, v, causal=causal, tiling=tiling,
                                                     interpret=True if interpret else None),
      # The Hopper kernels (Mosaic GPU: wgmma, TMA, a producer warpgroup), forward and backward.
      "mgpu": lambda q, k, v: flash_attention_pallas(q, k, v, causal=causal, tiling=mgpu_tiling(h),
                                                     interpret=True if interpret else None),
      "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"),
      "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla"),
  }
  try:
    from jax.experimental.pallas.ops.gpu import attention as jax_ref
    impls["jax_pallas"] = lambda q, k, v: jax_ref.mha(q, k, v, None, sm_scale=scale, causal=causal)
  except Exception as e:  # noqa: BLE001 - the module may move between jax versions
    print(f"jax.experimental.pallas.ops.gpu.attention unavailable: {type(e).__name__}: {e}")
  return impls


def _fwd_and_fwd_bwd(f):
  fwd = jax.jit(f)

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(do)

  return fwd, jax.jit(fwd_bwd)


def _rel_err(a, b) -> float:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _fmt(x, width=7, digits=1):
  if isinstance(x, str):
    return x.rjust(width)
  return f"{x:{width}.{digits}f}"


def run(args) -> dict:
  interpret = args.cpu_smoke
  if interpret:
    lengths, head_dims, tokens, heads = [128, 256], [64], 256, 2
  else:
    lengths, head_dims, tokens, heads = args.lengths, args.head_dims, args.tokens, args.heads
  names = ["ours", "mgpu", "cudnn", "xla", "jax_pallas"]
  start = time.perf_counter()
  tables = set(args.tables.split(","))
  decode = run_decode(args, interpret) if "decode" in tables else {"rows": [], "sweep": []}
  rows, errors = [], {}
  key = jax.random.PRNGKey(0)
  for h in (head_dims if "flash" in tables else []):
    for t in lengths:
      for causal in (False, True):
        b = max(1, tokens // t)
        row = {"T": t, "H": h, "causal": causal, "B": b, "N": heads}
        rows.append(row)
        if time.perf_counter() - start > args.budget_s:
          row["skipped"] = "budget"
          continue
        kq, kk, kv, kd, key = jax.random.split(key, 5)
        shape = (b, t, heads, h)
        q, k, v, do = (jax.random.normal(x, shape, jnp.bfloat16) for x in (kq, kk, kv, kd))
        outs = {}
        for name, f in _implementations(causal, h, interpret).items():
          if name == "xla" and t > args.xla_max_t:
            row[f"{name}_fwd"] = row[f"{name}_fwdbwd"] = "skip"
            continue
          fwd, fwd_bwd = _fwd_and_fwd_bwd(f)
          for mode, fn, fargs in (("fwd", fwd, (q, k, v)), ("fwdbwd", fwd_bwd, (q, k, v, do))):
            try:
              sec = _median_time(fn, fargs)
              row[f"{name}_{mode}"] = attention_flops(b, heads, t, h, causal, mode == "fwdbwd") / sec / 1e12
              if mode == "fwd":
                outs[name] = fn(*fargs)
            except Exception as e:  # noqa: BLE001 - one failure must not kill the table
              row[f"{name}_{mode}"] = "err"
              errors[f"{name}_{mode} T={t} H={h} causal={causal}"] = f"{type(e).__name__}: {str(e)[:400]}"
        ref = outs.get("cudnn", outs.get("xla"))
        if "ours" in outs and ref is not None:
          row["err_vs_ref"] = _rel_err(outs["ours"], ref)
        if "mgpu" in outs and ref is not None:
          row["mgpu_err_vs_ref"] = _rel_err(outs["mgpu"], ref)
        for mode in ("fwd", "fwdbwd"):
          for impl, key_ in (("ours", "ratio"), ("mgpu", "mgpu_ratio")):
            ours, cudnn = row.get(f"{impl}_{mode}"), row.get(f"cudnn_{mode}")
            if isinstance(ours, float) and isinstance(cudnn, float):
              row[f"{key_}_{mode}"] = ours / cudnn
        print(json.dumps(row), flush=True)

  sparse = run_block_sparse(args, interpret, start) if "sparse" in tables else []
  sweep = []
  if "sweep" in tables and not interpret and time.perf_counter() - start < args.budget_s:
    sweep = _tile_sweep(args, start)
  return {"rows": rows, "errors": errors, "sweep": sweep, "names": names, "decode": decode, "sparse": sparse,
          "seconds": time.perf_counter() - start}


def _sparse_tables(pattern: str, nb: int, heads: int):
  """(kv_blocks, kv_valid, kept block pairs per head) of a causal pattern over nb blocks."""
  import numpy as np  # noqa: PLC0415

  from layers.attention import block_sparse as bs  # noqa: PLC0415 - needs only jax and numpy
  if pattern == "local":  # the diagonal block and the 3 before it
    rows = bs.local_rows(nb, True, 3, 0)
    tables = [bs.pack_rows(rows)]
  else:  # "random": the diagonal block, the first block and 6 random earlier ones, per head
    rng = np.random.default_rng(0)
    tables = []
    for _ in range(heads):
      rows = [sorted({i, 0} | set(rng.choice(i, size=min(6, i), replace=False).tolist()) if i else [0])
              for i in range(nb)]
      tables.append(bs.pack_rows(rows))
  blocks, valid = bs.stack_heads(tables)
  return blocks, valid, float(valid.sum()) / blocks.shape[1]


def run_block_sparse(args, interpret: bool, start: float) -> list[dict]:
  """Causal block-sparse attention, bf16, H=128, block 64: the Pallas kernel vs the pure-JAX engine
  vs our dense Pallas kernel. TFLOP/s count only the kept block pairs (4 * block^2 * H each, x3.5
  for forward+backward); `vs dense` is the dense kernel's time over ours."""
  from layers.attention.block_sparse import block_sparse_attention  # noqa: PLC0415
  lengths, block, h = ([128, 256], 32, 64) if interpret else (args.sparse_lengths, 64, 128)
  out = []
  key = jax.random.PRNGKey(5)
  for t in lengths:
    for pattern in ("local", "random"):
      if time.perf_counter() - start > args.budget_s:
        return out
      b = max(1, args.tokens // t) if not interpret else 1
      heads = 2 if interpret else args.heads
      blocks, valid, pairs = _sparse_tables(pattern, -(-t // block), heads)
      kq, kk, kv, kd, key = jax.random.split(key, 5)
      q, k, v, do = (jax.random.normal(x, (b, t, heads, h), jnp.bfloat16) for x in (kq, kk, kv, kd))
      seg = jnp.ones((b, t), jnp.int32)
      flops = 4.0 * b * heads * pairs * block * block * h
      row = {"T": t, "pattern": pattern, "B": b, "N": heads, "H": h, "block": block,
             "density": pairs / (-(-t // block)) ** 2}
      impls = {
          "pallas": lambda q, k, v: block_sparse_attention_pallas(q, k, v, seg, blocks, valid, block=block,
                                                                  causal=True,
                                                                  interpret=True if interpret else None),
          "engine": lambda q, k, v: block_sparse_attention(q, k, v, seg, blocks, valid, block=block, causal=True),
          "dense": lambda q, k, v: flash_attention_pallas(q, k, v, causal=True,
                                                          interpret=True if interpret else None),
      }
      for name, f in impls.items():
        fwd, fwd_bwd = _fwd_and_fwd_bwd(f)
        for mode, fn, fargs in (("fwd", fwd, (q, k, v)), ("fwdbwd", fwd_bwd, (q, k, v, do))):
          try:
            sec = _median_time(fn, fargs)
            row[f"{name}_{mode}_ms"] = sec * 1e3
            row[f"{name}_{mode}"] = flops * (3.5 if mode == "fwdbwd" else 1.0) / sec / 1e12
          except Exception as e:  # noqa: BLE001
            row[f"{name}_{mode}"] = "err"
            row[f"{name}_{mode}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(json.dumps(row), flush=True)
      out.append(row)
  # Launch settings and program tiles of our kernel at the last length, both patterns (the first
  # GPU run found each kept block at ~0.3x the dense kernel's rate with the default 8 warps, 2
  # stages, one 64-row block per program). Tiles (q_tile, kv_tile): table blocks per forward/dQ
  # and per dK/dV program, walking the union of their rows (kernels/block_sparse_pallas.py).
  # (4-block tiles are left out: at block 64, H=128 their fp32 accumulators would spill.)
  settings = ((1, 1, None, 2), (2, 2, None, 2), (2, 1, None, 2), (1, 2, None, 2), (2, 2, None, 3), (1, 1, 4, 3),
              (1, 1, 8, 3))
  if interpret:
    settings = ((2, 2, None, 2),)
  tables = {p: _sparse_tables(p, -(-t // block), heads) for p in ("local", "random")}
  for q_tile, kv_tile, warps, stages in settings:
    for pattern, (blocks, valid, pairs) in tables.items():
      if time.perf_counter() - start > args.budget_s:
        return out
      flops = 4.0 * b * heads * pairs * block * block * h
      cfg = {"T": t, "pattern": pattern, "q_tile": q_tile, "kv_tile": kv_tile, "num_warps": warps or "default",
             "num_stages": stages}
      f = lambda q, k, v, w=warps, st=stages, qt=q_tile, kt=kv_tile, bl=blocks, va=valid: block_sparse_attention_pallas(
          q, k, v, seg, bl, va, block=block, causal=True, num_warps=w, num_stages=st, q_tile=qt, kv_tile=kt,
          interpret=True if interpret else None)
      fwd, fwd_bwd = _fwd_and_fwd_bwd(f)
      for mode, fn, fargs in (("fwd", fwd, (q, k, v)), ("fwdbwd", fwd_bwd, (q, k, v, do))):
        try:
          cfg[mode] = flops * (3.5 if mode == "fwdbwd" else 1.0) / _median_time(fn, fargs) / 1e12
        except Exception as e:  # noqa: BLE001
          cfg[mode] = f"err {type(e).__name__}: {str(e)[:200]}"
      print(json.dumps(cfg), flush=True)
      out.append(cfg)
  return out


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
  """Device-to-device bytes/s (read + written) of an elementwise pass over a bf16 buffer."""
  x = jax.random.normal(jax.random.PRNGKey(2), (nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda x: x + jnp.bfloat16(1))  # not x * 1: XLA would elide that copy
  return 2 * x.nbytes / _median_time(f, (x,), target_s=0.05)


def run_decode(args, interpret: bool) -> dict:
  """Split-KV decode (1 new token, full caches): achieved bandwidth of the K/V reads."""
  if interpret:
    lengths, b, n, kvh, h, block = [256, 512], 2, 8, 2, 64, 64
  else:
    lengths, b, n, kvh, h, block = args.decode_lengths, 4, 32, 8, 128, 64
  try:
    copy = copy_bandwidth(1 << 24 if interpret else 1 << 30)
  except Exception as e:  # noqa: BLE001
    copy, _ = float("nan"), print(f"copy bandwidth failed: {e}")
  rows = []
  key = jax.random.PRNGKey(3)
  for s in lengths:
    kq, kk, kv, key = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, 1, n, h), jnp.bfloat16)
    kc = jax.random.normal(kk, (b, s, kvh, h), jnp.bfloat16)
    vc = jax.random.normal(kv, (b, s, kvh, h), jnp.bfloat16)
    lens = jnp.full((b,), s, jnp.int32)
    nbytes = kc.nbytes + vc.nbytes + 2 * q.nbytes
    row = {"S": s, "B": b, "N": n, "K": kvh, "H": h, "copy_GBps": copy / 1e9}
    impls = {
        "ours": lambda q, k, v, l: decode_attention_pallas(q, k, v, l, block_k=block,
                                                           interpret=True if interpret else None),
        "xla": lambda q, k, v, l: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=l,
                                                               implementation="xla"),
        "cudnn": lambda q, k, v, l: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=l,
                                                                 implementation="cudnn"),
    }
    for name, f in impls.items():
      try:
        bw = nbytes / _median_time(jax.jit(f), (q, kc, vc, lens))
        row[f"{name}_GBps"] = bw / 1e9
        row[f"{name}_frac"] = bw / copy
      except Exception as e:  # noqa: BLE001
        row[f"{name}_GBps"] = row[f"{name}_frac"] = "err"
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(row), flush=True)
    rows.append(row)
  sweep = []
  if not interpret:
    s = max(lengths)
    k1, k2, k3 = jax.random.split(key, 3)
    # Separate K and V buffers: one buffer read twice would hit L2 on the second read.
    kc = jax.random.normal(k1, (b, s, kvh, h), jnp.bfloat16)
    vc = jax.random.normal(k2, (b, s, kvh, h), jnp.bfloat16)
    q = jax.random.normal(k3, (b, 1, n, h), jnp.bfloat16)
    lens = jnp.full((b,), s, jnp.int32)
    for block_k, stages, warps, splits in [(64, 3, 4, None), (128, 2, 4, None), (128, 3, 8, None),
                                           (64, 4, 4, None), (64, 3, 4, 64)]:
      cfg = {"block_k": block_k, "num_stages": stages, "num_warps": warps, "num_splits": splits}
      f = jax.jit(lambda q, k, v, l, cfg=cfg: decode_attention_pallas(q, k, v, l, **cfg))
      try:
        cfg["frac"] = (kc.nbytes + vc.nbytes + 2 * q.nbytes) / _median_time(f, (q, kc, vc, lens)) / copy
      except Exception as e:  # noqa: BLE001
        cfg["frac"] = f"err {type(e).__name__}: {str(e)[:200]}"
      print(json.dumps(cfg), flush=True)
      sweep.append(cfg)
  return {"rows": rows, "sweep": sweep}


def _tile_sweep(args, start) -> list[dict]:
  """A few tilings at T=4k, H=128, non-causal and causal (fwd and fwd+bwd TFLOP/s)."""
  t, h = 4096, 128
  b = max(1, args.tokens // t)
  base = default_tiling(h)
  two_kernel = [
      base,  # 128-row forward tiles, 64-row backward programs at 4 warps
      Tiling(128, 64, 32, 128, 128, 32, num_warps=8, num_stages=3, num_warps_bwd=8, num_stages_bwd=3),  # 11-27's
      Tiling(128, 64, 64, 128, 128, 64, num_warps=8, num_stages=3, num_warps_bwd=8, num_stages_bwd=2),
  ]
  # The same tiles with the one-kernel backward (dQ by fp32 atomic adds: 5 matrix products a tile pair, not 7).
  candidates = two_kernel + [dataclasses.replace(t, fused_dq=True) for t in two_kernel]
  # The Mosaic GPU kernels first (never timed yet): the default (forward 128-row K/V tiles x 2 slots,
  # backward 64-row tiles x 2), its one-kernel backward (dQ by TMA reduce-adds), the forward's tile
  # and ring depth, the backward's, and the Mosaic GPU forward with the Triton backward.
  mgpu = mgpu_tiling(h)
  candidates = [mgpu, dataclasses.replace(mgpu, fused_dq=True), dataclasses.replace(mgpu, block_k=64, num_stages=3),
                dataclasses.replace(mgpu, block_k=64, num_stages=4), dataclasses.replace(mgpu, num_stages_bwd=3),
                dataclasses.replace(mgpu, block_k_dq=128), mgpu_tiling(h, backward="triton")] + candidates
  key = jax.random.PRNGKey(1)
  q, k, v, do = (jax.random.normal(x, (b, t, args.heads, h), jnp.bfloat16) for x in jax.random.split(key, 4))
  out = []
  for tiling in candidates:
    for causal in (False, True):
      if time.perf_counter() - start > args.budget_s:
        return out
      row = {"tiling": tiling.__dict__, "causal": causal}
      f = lambda q, k, v: flash_attention_pallas(q, k, v, causal=causal, tiling=tiling)
      fwd, fwd_bwd = _fwd_and_fwd_bwd(f)
      for mode, fn, fargs in (("fwd", fwd, (q, k, v)), ("fwdbwd", fwd_bwd, (q, k, v, do))):
        try:
          row[mode] = attention_flops(b, args.heads, t, h, causal, mode == "fwdbwd") / _median_time(fn, fargs) / 1e12
        except Exception as e:  # noqa: BLE001
          row[mode] = f"err {type(e).__name__}: {str(e)[:200]}"
      print(json.dumps(row), flush=True)
      out.append(row)
  return out


def print_tables(result: dict, device: str) -> None:
  names = result["names"]
  if result["rows"]:
    print(f"\n## Attention TFLOP/s, bf16, {device}, jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d')} (B*T={result['rows'][0]['B'] * result['rows'][0]['T']}, "
          f"N={result['rows'][0]['N']})")
    head = "| T | H | causal | " + " | ".join(f"{n} fwd" for n in names) + " | " + \
        " | ".join(f"{n} f+b" for n in names) + " | ours/cuDNN fwd | ours/cuDNN f+b | mgpu/cuDNN fwd | " \
        "mgpu/cuDNN f+b | rel err vs cuDNN (ours, mgpu) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in result["rows"]:
      if "skipped" in r:
        print(f"| {r['T']} | {r['H']} | {r['causal']} | skipped ({r['skipped']}) |")
        continue
      cells = [_fmt(r.get(f"{n}_fwd", "-")) for n in names] + [_fmt(r.get(f"{n}_fwdbwd", "-")) for n in names]
      cells += [_fmt(r.get(f"{k}_{m}", "-"), digits=2) for k in ("ratio", "mgpu_ratio") for m in ("fwd", "fwdbwd")]
      errs = [r.get("err_vs_ref"), r.get("mgpu_err_vs_ref")]
      cells.append(", ".join(f"{e:.1e}" if isinstance(e, float) else "-" for e in errs))
      print(f"| {r['T']} | {r['H']} | {r['causal']} | " + " | ".join(cells) + " |")
  if result["sweep"]:
    print("\n## Tile sweep (ours), T=4096, H=128: TFLOP/s")
    print("| kernels fwd/bwd | bq | bk | bq_dkv | bk_dkv | bq_dq | bk_dq | warps fwd/bwd | stages fwd/bwd | fused dQ | "
          "causal | fwd | f+b |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in result["sweep"]:
      t = s["tiling"]
      print(f"| {t['forward']}/{t['backward']} | {t['block_q']} | {t['block_k']} | {t['block_q_dkv']} | {t['block_k_dkv']} | {t['block_q_dq']} | "
            f"{t['block_k_dq']} | {t['num_warps']}/{t['num_warps_bwd']} | {t['num_stages']}/{t['num_stages_bwd']} | "
            f"{t['fused_dq']} | {s['causal']} | {_fmt(s['fwd'] if isinstance(s['fwd'], float) else 'err')} | "
            f"{_fmt(s['fwdbwd'] if isinstance(s['fwdbwd'], float) else 'err')} |")
  dec = result["decode"]
  if dec["rows"]:
    r0 = dec["rows"][0]
    print(f"\n## Decode (1 new token, full caches), bf16, B={r0['B']}, N={r0['N']}, K={r0['K']}, H={r0['H']}: "
          f"K/V read bandwidth, GB/s (fraction of a measured copy, {r0['copy_GBps']:.0f} GB/s read+write)")
    print("| cache length | ours | xla | cudnn |")
    print("|---|---|---|---|")
    for r in dec["rows"]:
      cell = lambda n: (f"{r[n + '_GBps']:.0f} ({r[n + '_frac']:.2f})" if isinstance(r[n + "_GBps"], float)
                        else "err")
      print(f"| {r['S']} | {cell('ours')} | {cell('xla')} | {cell('cudnn')} |")
    for r in dec["rows"]:
      for n in ("ours", "xla", "cudnn"):
        if f"{n}_error" in r:
          print(f"  decode {n} S={r['S']}: {r[n + '_error'].splitlines()[0][:200]}")
          break
  if dec["sweep"]:
    print("\n## Decode sweep (ours) at the longest cache: fraction of copy bandwidth")
    print("| block_k | stages | warps | splits | fraction |")
    print("|---|---|---|---|---|")
    for c in dec["sweep"]:
      frac = f"{c['frac']:.2f}" if isinstance(c["frac"], float) else c["frac"][:60]
      print(f"| {c['block_k']} | {c['num_stages']} | {c['num_warps']} | {c['num_splits'] or 'auto'} | {frac} |")
  if result.get("sparse"):
    print("\n## Block-sparse attention, causal, bf16: TFLOP/s on the kept block pairs (ms per call); "
          "'dense/ours' = dense kernel time over the block-sparse kernel's")
    print("| T | pattern | density | pallas fwd | engine fwd | pallas f+b | engine f+b | dense/ours fwd | "
          "dense/ours f+b |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in [r for r in result["sparse"] if "num_warps" not in r]:
      cell = lambda k: (f"{r[k]:.1f} ({r[k + '_ms']:.2f})" if isinstance(r.get(k), float) else "err")
      ratio = lambda m: (f"{r[f'dense_{m}_ms'] / r[f'pallas_{m}_ms']:.2f}"
                         if isinstance(r.get(f"dense_{m}"), float) and isinstance(r.get(f"pallas_{m}"), float)
                         else "-")
      print(f"| {r['T']} | {r['pattern']} | {r['density']:.3f} | {cell('pallas_fwd')} | {cell('engine_fwd')} | "
            f"{cell('pallas_fwdbwd')} | {cell('engine_fwdbwd')} | {ratio('fwd')} | {ratio('fwdbwd')} |")
      for k in list(r):
        if k.endswith("_error"):
          print(f"  {k} T={r['T']} {r['pattern']}: {r[k].splitlines()[0][:200]}")
    launch = [r for r in result["sparse"] if "num_warps" in r]
    if launch:
      print(f"\n## Block-sparse kernel launch settings and program tiles, T={launch[0]['T']}: TFLOP/s on kept "
            f"pairs (default: 1 block per program, 8 warps at block 64 and H=128, 2 stages)")
      print("| pattern | q_tile | kv_tile | warps | stages | fwd | f+b |")
      print("|---|---|---|---|---|---|---|")
      for r in launch:
        fmt = lambda x: f"{x:.1f}" if isinstance(x, float) else str(x)[:60]
        print(f"| {r['pattern']} | {r['q_tile']} | {r['kv_tile']} | {r['num_warps']} | {r['num_stages']} | "
              f"{fmt(r.get('fwd'))} | {fmt(r.get('fwdbwd'))} |")
  if result["errors"]:
    print(f"\n{len(result['errors'])} failed measurements (first line of each):")
    for k, v in list(result["errors"].items())[:12]:
      print(f"  {k}: {v.splitlines()[0][:200]}")
  print(f"\nbench wall time {result['seconds']:.0f} s")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--head_dims", type=int, nargs="+", default=[128, 64])
  p.add_argument("--tokens", type=int, default=16384, help="B*T, constant across lengths")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--decode_lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
  p.add_argument("--sparse_lengths", type=int, nargs="+", default=[4096, 16384])
  p.add_argument("--xla_max_t", type=int, default=8192, help="skip XLA's dense path above this length")
  p.add_argument("--budget_s", type=float, default=240.0, help="skip the remaining rows after this many seconds")
  p.add_argument("--out", default=None, help="directory for bench_kernels.json")
  p.add_argument("--tables", default=",".join(TABLES),
                 help=f"comma-separated subset of {','.join(TABLES)} (default: all)")
  p.add_argument("--cpu_smoke", action="store_true", help="tiny shapes, our kernel interpreted: checks the script")
  args = p.parse_args(argv)
  unknown = set(args.tables.split(",")) - set(TABLES)
  if unknown:
    p.error(f"--tables={args.tables!r} names {sorted(unknown)}; choose from {','.join(TABLES)}")
  if jax.default_backend() != "gpu" and not args.cpu_smoke:
    print(f"bench_kernels: no GPU (backend {jax.default_backend()!r}); nothing to time. Use --cpu_smoke to check "
          f"the script.")
    return 0
  device = jax.devices()[0].device_kind
  result = run(args)
  result.update(device=device, jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
      json.dump(result, f, indent=1)
  print_tables(result, device)
  return 0


if __name__ == "__main__":
  sys.exit(main())
