"""Per-device compiled memory under sequence, FSDP and tensor parallelism (CPU, compile only).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_parallel.py [--quick] [--block 128]

Prints three tables from `jax.jit(...).lower(...).compile().memory_analysis()` (exact and
deterministic; nothing runs):
1. one attention layer's forward+backward (q, k, v -> out, bf16, B=1, N=8, H=64; loss
   sum(out^2), so the output gradient is data as in a model) with the length split over
   `sequence` = 1, 2, 4, 8 by ring attention (flash blocks inside, `--block` on both sides:
   the model's default 128), at T = 8k, 16k, 32k;
2. one short-convolution layer's forward+backward (`conv`, 4 causal taps, D=1024, bf16, B=1)
   with the length split over `sequence` = 8: the compiler's own sharding (`auto`) against the
   explicit halo exchange (`halo`), per-device memory and the collectives in the compiled
   program;
3. the full train step of a ~100M-parameter LM under data / FSDP / tensor meshes:
   arguments (params + Adam moments + batch) and temporaries per device.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from layers.attention.flash import flash_attention  # noqa: E402
from layers.attention import ops  # noqa: E402
from parallel.sequence import SequenceParallel  # noqa: E402

RULES = (("batch", ("data", "fsdp")), ("length", "sequence"), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("head_dim", None))


def mib(x):
  return f"{x / 2**20:,.1f}"


def attention_memory(t: int, n: int, heads=8, head_dim=64, block=128):
  devs = np.array(jax.devices()[:n]).reshape(1, 1, 1, n)
  mesh = Mesh(devs, ("data", "fsdp", "tensor", "sequence"),
              axis_types=(jax.sharding.AxisType.Auto,) * 4)
  x = jax.ShapeDtypeStruct((1, t, heads, head_dim), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(None, "sequence" if n > 1 else None)))
  tok = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=NamedSharding(mesh, P(None, "sequence" if n > 1 else None)))

  def loss(q, k, v, seg, idx):
    if n == 1:
      out = flash_attention(q, k, v, seg, seg, causal=True, block_q=block, block_k=block)
    else:
      sp = SequenceParallel(mesh, RULES, "ring")
      out = sp.attention(None, q, k, v, seg, idx, causal=True, options=ops.Options(block_q=block, block_k=block))
    return jnp.sum(jnp.square(out.astype(jnp.float32)))  # d_out = 2 out: data, as in a model (not a constant)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, tok, tok).compile()
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def conv_memory(t: int, n: int, strategy: str, d=1024, kernel=4):
  """(arguments, outputs, temporaries, {collective: count}) of a conv layer's forward+backward."""
  from flax import nnx

  from layers.mixer_base import MixContext, MixerSpec, use_sequence_parallel
  from layers.ssm.conv import ShortConv
  devs = np.array(jax.devices()[:n]).reshape(1, 1, 1, n)
  mesh = Mesh(devs, ("data", "fsdp", "tensor", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 4)
  spec = MixerSpec(d_model=d, num_heads=8, num_kv_heads=8, causal=True, positions="none", layer_index=0,
                   num_layers=1, max_len=t, options=(("kernel", kernel),), name="conv")
  graphdef, params = nnx.split(ShortConv(spec, rngs=nnx.Rngs(0)))
  length = NamedSharding(mesh, P(None, "sequence"))
  x = jax.ShapeDtypeStruct((1, t, d), jnp.bfloat16, sharding=length)
  tok = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=length)
  sp = SequenceParallel(mesh, RULES + (("embed", None),), strategy)

  def loss(params, x, seg):
    with use_sequence_parallel(sp):
      y = nnx.merge(graphdef, params)(x, MixContext(segment_ids=seg, positions=seg))
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, tok).compile()
  m = compiled.memory_analysis()
  hlo = compiled.as_text()
  counts = {c: len(re.findall(rf" {c}(-start)?\(", hlo)) for c in COLLECTIVES}
  return m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes, counts


def model_memory(mesh_shape):
  from trainer.config import load_config
  from trainer.experiment import Experiment
  overrides = ["model.num_layers=12", "model.d_model=768", "model.num_heads=12", "task.seq_len=512",
               "batch_size=8", "model.dtype=bfloat16", "model.mixer=flash"]
  overrides += [f"mesh.{k}={v}" for k, v in zip(("data", "fsdp", "tensor", "sequence"), mesh_shape)]
  exp = Experiment(load_config("configs/default.py", overrides), "/nonexistent-bench-dir", read_only=True)
  stats = exp.compile_stats()
  return exp.num_params, stats


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="T up to 8k and two meshes only")
  parser.add_argument("--block", type=int, default=128, help="flash block (query and key) on every path")
  parser.add_argument("--tables", default="ring,conv,model", help="which tables, comma separated")
  args = parser.parse_args()
  tables = set(args.tables.split(","))
  lengths = [8192] if args.quick else [8192, 16384, 32768]
  if "ring" in tables:
    print(f"## Ring attention, one layer forward+backward, per-device compiled memory (MiB), blocks {args.block}\n")
    print("| T | sequence | arguments | outputs | temporaries | total | total vs sequence=1 |")
    print("|---|---|---|---|---|---|---|")
    for t in lengths:
      base = None
      for n in (1, 2, 4, 8):
        a, o, tmp = attention_memory(t, n, block=args.block)
        total = a + o + tmp
        base = base or total
        print(f"| {t} | {n} | {mib(a)} | {mib(o)} | {mib(tmp)} | {mib(total)} | {total / base:.3f} |", flush=True)
  if "conv" in tables:
    print("\n## Short convolution (4 causal taps, D=1024, bf16), one layer forward+backward, sequence=8, "
          "per device (MiB)\n")
    print("| T | strategy | arguments | outputs | temporaries | collectives in the compiled program |")
    print("|---|---|---|---|---|---|")
    for t in lengths:
      for strategy in ("auto", "halo"):
        a, o, tmp, counts = conv_memory(t, 8, strategy)
        used = ", ".join(f"{k} x{v}" for k, v in counts.items() if v) or "none"
        print(f"| {t} | {strategy} | {mib(a)} | {mib(o)} | {mib(tmp)} | {used} |", flush=True)
  if "model" in tables:
    print("\n## ~100M-parameter LM train step (12 x d768, T=512, global batch 8, bf16), per device (MiB)\n")
    print("| mesh (data, fsdp, tensor, sequence) | params | arguments | temporaries | total |")
    print("|---|---|---|---|---|")
    meshes = [(8, 1, 1, 1), (1, 8, 1, 1)] if args.quick else [(8, 1, 1, 1), (1, 8, 1, 1), (2, 1, 4, 1), (1, 1, 8, 1),
                                                              (2, 2, 2, 1)]
    for shape in meshes:
      n_params, s = model_memory(shape)
      print(f"| {shape} | {n_params / 1e6:.1f}M | {mib(s['argument_bytes'])} | {mib(s['temp_bytes'])} | "
            f"{mib(s['total_bytes'])} |", flush=True)


if __name__ == "__main__":
  main()
