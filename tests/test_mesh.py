"""Sharded train steps equal the unsharded one on every mesh shape (data, FSDP, TP, sequence)."""

import os

import jax
import numpy as np
import pytest

from parallel import mesh as mesh_lib
from trainer import steps
from trainer.config import load_config
from trainer.experiment import Experiment

MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1), (1, 1, 2, 4), (2, 1, 1, 4), (1, 1, 1, 8)]
TASKS = {
    # causal LM with a loss mask (queries only); ring runs store rows in zigzag order
    "mqar": ["task.seq_len=64", "model.num_heads=4", "model.num_kv_heads=2", "model.d_model=32", "batch_size=8",
             "model.flash.block_q=4", "model.flash.block_k=4"],
    # bidirectional classifier on right-padded sequences
    "listops": ["model.num_heads=4", "model.d_model=32", "batch_size=8", "model.mlp=swiglu"],
}


def _experiment(task, mesh, tmp_path, strategy="auto"):
  sizes = dict(zip(("data", "fsdp", "tensor", "sequence"), mesh))
  mixer = ["model.mixer=linear", "model.num_kv_heads=4"] if strategy == "scan" else []
  cfg = load_config(f"configs/{task}.py:smoke", TASKS[task] + [f"mesh.{k}={v}" for k, v in sizes.items()]
                    + [f"parallel.sequence_strategy={strategy}"] + mixer)
  return Experiment(cfg, str(tmp_path / "none"), read_only=True)


SP_CASES = [("ring", (1, 1, 1, 8)), ("ring", (2, 1, 1, 4)), ("all_to_all", (1, 1, 1, 4)), ("all_gather", (1, 1, 2, 4)),
            ("scan", (2, 1, 1, 4))]  # scan: the linear-attention mixer (parallel/scan.py)


_REFERENCE = {}  # (task, scan mixer?) -> (state, batch, new state, metrics) of the one-device step


def _single_device_step(exp, host_state, host_batch, key):
  """The one-device train step on the same state and batch, computed once per model config: every
  mesh starts from the same initial state and batch (checked leaf by leaf before reuse)."""
  leaves = lambda tree: jax.tree.leaves(tree)
  if key in _REFERENCE:
    state, batch, new_state, metrics = _REFERENCE[key]
    same = all(np.array_equal(a, b) for a, b in zip(leaves((state, batch)), leaves((host_state, host_batch))))
    if same and len(leaves((state, batch))) == len(leaves((host_state, host_batch))):
      return new_state, metrics
  one = jax.devices()[0]
  ref_step = jax.jit(steps.make_train_step(exp.fm, exp.tx, exp.lr_schedule))
  new_state, metrics = jax.device_get(ref_step(jax.device_put(host_state, one), jax.device_put(host_batch, one)))
  _REFERENCE[key] = (host_state, host_batch, new_state, metrics)
  return new_state, metrics


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("mesh,strategy", [(m, "auto") for m in MESHES] + [(m, s) for s, m in SP_CASES],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_sharded_step_equals_single_device(task, mesh, strategy, tmp_path):
  if strategy == "all_to_all":
    mesh = (2,) + mesh[1:]  # 8 devices: data 2 x sequence 4
  exp = _experiment(task, mesh, tmp_path, strategy)
  state, batch = exp.fresh_state(), exp.train_batch(0)
  host_state, host_batch = jax.device_get(state), jax.device_get(batch)
  new_state, metrics = exp.compiled_train_step()(state, batch)

  ref_state, ref_metrics = _single_device_step(exp, host_state, host_batch, key=(task, strategy == "scan"))

  for k in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=2e-6, err_msg=k)
  got, want = jax.device_get(new_state["params"]), jax.device_get(ref_state["params"])
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("mesh,bidirectional", [((4, 1, 1, 2), False), ((2, 1, 1, 4), False), ((2, 1, 1, 4), True)],
                         ids=["dp4-seq2", "dp2-seq4", "dp2-seq4-bidirectional"])
def test_mixed_schedule_trains_under_ring(mesh, bidirectional, tmp_path):
  """configs/mqar.py's model, a 5-tap conv layer then attention, under
  `parallel.sequence_strategy=ring`: the conv takes the halo strategy (its 4 earlier tokens
  from the left neighbour), attention the ring, and the step equals one device's. Rows stay in
  storage order (the conv reads neighbouring stored tokens, so no zigzag). The bidirectional
  case (listops) also needs the right neighbour's tokens."""
  sizes = dict(zip(("data", "fsdp", "tensor", "sequence"), mesh))
  task = "listops" if bidirectional else "mqar"
  cfg = load_config(f"configs/{task}.py:smoke", TASKS[task] + [f"mesh.{k}={v}" for k, v in sizes.items()]
                    + ["parallel.sequence_strategy=ring", "model.num_layers=2", "model.mixer_schedule=conv,mixer",
                       "model.mixer=flash", "model.conv.kernel=5", "model.flash.block_q=8", "model.flash.block_k=8"])
  exp = Experiment(cfg, str(tmp_path / "none"), read_only=True)
  assert exp.sequence_parallel is not None and exp.layout_perm is None
  state, batch = exp.fresh_state(), exp.train_batch(0)
  host_state, host_batch = jax.device_get(state), jax.device_get(batch)
  new_state, metrics = exp.compiled_train_step()(state, batch)
  one = jax.devices()[0]
  ref_step = jax.jit(steps.make_train_step(exp.fm, exp.tx, exp.lr_schedule))
  ref_state, ref_metrics = jax.device_get(ref_step(jax.device_put(host_state, one), jax.device_put(host_batch, one)))
  for k in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=2e-6, err_msg=k)
  got, want = jax.device_get(new_state["params"]), jax.device_get(ref_state["params"])
  assert any("conv_weight" in name for name in want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_parameters_really_are_sharded():
  """FSDP splits the embed axis, TP splits heads and the MLP hidden: per-device shards shrink."""
  cfg = load_config("configs/mqar.py:smoke", ["model.num_heads=4", "model.d_model=32", "mesh.data=2",
                                              "mesh.fsdp=2", "mesh.tensor=2"])
  exp = Experiment(cfg, "/nonexistent", read_only=True)
  state = exp.fresh_state()
  q = state["params"]["encoder/blocks/0/mixer/query/kernel"]  # [D, N, H]
  assert q.sharding.spec == mesh_lib.P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (16, 2, 8)
  up = state["params"]["encoder/blocks/0/mlp/up/kernel"]  # [D, F]
  assert up.addressable_shards[0].data.shape == (16, 64)
  # Adam moments follow their parameter's sharding.
  mu = jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, dict) and "encoder/blocks/0/mlp/up/kernel" in x)
  moments = [t["encoder/blocks/0/mlp/up/kernel"] for t in mu if isinstance(t, dict)]
  assert moments and all(m.addressable_shards[0].data.shape == (16, 64) for m in moments)


CURVE = ["--config=configs/default.py:smoke", "--config.total_steps=20", "--config.log_every=1",
         "--config.eval_every=0", "--config.checkpoint_every=0", "--config.batch_size=8", "--config.task.seq_len=64",
         "--config.model.num_heads=4", "--config.progress_bar=false", "--config.keep_best=false"]


@pytest.mark.parametrize("mesh_args", [
    ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
    ["--config.mesh.data=1", "--config.mesh.tensor=2", "--config.mesh.sequence=4",
     "--config.parallel.sequence_strategy=ring", "--config.model.mixer=flash", "--config.model.flash.block_q=8",
     "--config.model.flash.block_k=8"],
], ids=["dp2-fsdp2-tp2", "tp2-ring4"])
def test_twenty_step_loss_curve_equals_one_device(mesh_args, tmp_path):
  """A real single-device run (its own process with one CPU device) against the same
  20 steps on a sharded mesh: the loss curves agree to float32 reduction-order noise."""
  import re
  from tests.helpers import run_cli, train_losses
  one = str(tmp_path / "one")
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
  extra = [a for a in mesh_args if "mesh." not in a]  # same model/strategy settings, one device
  proc = run_cli("trainer.train", *CURVE, *extra, f"--workdir={one}",
                 env_extra={"XLA_FLAGS": flags + " --xla_force_host_platform_device_count=1"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  sharded = str(tmp_path / "sharded")
  from trainer import train as train_mod
  assert train_mod.main([*CURVE, *mesh_args, f"--workdir={sharded}"]) == 0
  a, b = train_losses(one), train_losses(sharded)
  assert sorted(a) == list(range(1, 21)) and sorted(b) == sorted(a)
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5)
  assert a[20] < a[1] - 0.5  # the curve really moves
