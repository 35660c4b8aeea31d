"""Global batches as sharded jax.Arrays, each host generating only the rows it holds.

The train batch of step s is examples [s*B, (s+1)*B) of the endless train stream, so
the iterator state is the step number and resume is exact. Held-out evaluation uses
examples [0, n) of its split, the same ones every time.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from parallel import mesh as mesh_lib
from trainer.data.base import Task


def batch_shardings(task: Task, batch_size: int, mesh: Mesh, rules, perm=None) -> tuple[dict, dict]:
  """(shapes, shardings) of a global batch, from one example's layout."""
  ex = task.example("validation", 0)
  shapes = {k: jax.ShapeDtypeStruct((batch_size,) + v.shape, v.dtype) for k, v in ex.items()}
  if perm is not None:
    shapes["index"] = jax.ShapeDtypeStruct((batch_size, len(perm)), np.int32)
  # score_positions [B, P] index the length axis but are not laid out along it: batch axes only.
  shard = {k: NamedSharding(mesh, mesh_lib.batch_spec(len(s.shape), mesh, rules, seq_dim=k != "score_positions"))
           for k, s in shapes.items()}
  return shapes, shard


def permute_rows(batch: dict, perm: np.ndarray) -> dict:
  """Stores every [rows, T, ...] array in the order `perm` and adds `index` (= true positions)."""
  t = len(perm)
  out = {k: (v[:, perm] if v.ndim >= 2 and v.shape[1] == t and k != "score_positions" else v)
         for k, v in batch.items()}
  if "score_positions" in batch:  # true position p is stored at j with perm[j] = p
    out["score_positions"] = np.argsort(perm).astype(np.int32)[batch["score_positions"]]
  out["index"] = np.broadcast_to(perm.astype(np.int32), (next(iter(batch.values())).shape[0], t)).copy()
  return out


def global_batch(task: Task, split: str, example_ids: np.ndarray, shapes: dict, shardings: dict,
                 perm: np.ndarray | None = None) -> dict:
  """Builds each array with `make_array_from_callback`: a device's callback generates
  only that device's rows (memoised, so replicas on one host generate them once).
  With `perm`, rows are stored permuted along the length (zigzag load balancing)."""
  memo: dict[tuple[int, int], dict] = {}

  def rows(sl: slice) -> dict:
    start, stop, _ = sl.indices(len(example_ids))
    if (start, stop) not in memo:
      batch = task.batch(split, example_ids[start:stop])
      memo[(start, stop)] = batch if perm is None else permute_rows(batch, perm)
    return memo[(start, stop)]

  out = {}
  for key, shape in shapes.items():
    out[key] = jax.make_array_from_callback(shape.shape, shardings[key],
                                            lambda idx, key=key: rows(idx[0])[key][(slice(None),) + tuple(idx[1:])])
  return out


def train_example_ids(step: int, batch_size: int) -> np.ndarray:
  return np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)


def eval_example_ids(num_examples: int, batch_size: int) -> list[np.ndarray]:
  """Held-out examples [0, n) rounded up to whole batches."""
  n = math.ceil(num_examples / batch_size) * batch_size
  return [np.arange(i, i + batch_size, dtype=np.int64) for i in range(0, n, batch_size)]
