"""Global batches as sharded jax.Arrays, each host producing only the rows it holds, ahead of use.

The train batch of step s is examples [s*B, (s+1)*B) of the endless train stream, so
the iterator state is the step number and resume is exact. Held-out evaluation uses
examples [0, n) of its split, the same ones every time.

Batches are produced by a grain pipeline (`BatchStream`): a `MapDataset` over step
numbers whose element s is this process's rows of batch s (a pure function of the
task, the split and s), read ahead by a pool of threads (`data.threads`) or of worker
processes (`data.workers`), `data.prefetch` batches deep. The main thread only turns
the host rows into global arrays and counts the time it waited for them.
"""

from __future__ import annotations

import math
import time

import grain
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


def local_row_ranges(shapes: dict, shardings: dict) -> tuple[tuple[int, int], ...]:
  """The row ranges [start, stop) of a global batch that this process's devices hold."""
  out = set()
  for key, sharding in shardings.items():
    rows = shapes[key].shape[0]
    for index in sharding.addressable_devices_indices_map(shapes[key].shape).values():
      start, stop, _ = (index[0] if index else slice(None)).indices(rows)
      out.add((start, stop))
  return tuple(sorted(out))


class HostRows:
  """Element s of a stream: this process's rows of batch s, as {(start, stop): arrays}.

  A plain picklable object (worker processes receive a copy); `example_ids(s)` is the
  s-th batch's example ids."""

  def __init__(self, task: Task, split: str, id_batches, ranges, perm: np.ndarray | None):
    self.task, self.split, self.id_batches, self.ranges, self.perm = task, split, id_batches, ranges, perm

  def __call__(self, s: int) -> dict:
    ids = self.id_batches(int(s))
    out = {}
    for start, stop in self.ranges:
      batch = self.task.batch(self.split, ids[start:stop])
      out[(start, stop)] = batch if self.perm is None else permute_rows(batch, self.perm)
    return out


class TrainIds:
  """Example ids of train batch s (picklable, unlike a lambda)."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def __call__(self, s: int) -> np.ndarray:
    return train_example_ids(s, self.batch_size)


class EvalIds:
  def __init__(self, id_batches: list[np.ndarray]):
    self.id_batches = id_batches

  def __call__(self, s: int) -> np.ndarray:
    return self.id_batches[s]


def assemble(host: dict, shapes: dict, shardings: dict) -> dict:
  """Global jax.Arrays from this process's rows: each device's callback slices its part."""
  by_start = {}
  for (start, stop), batch in host.items():
    by_start[(start, stop)] = batch

  def part(key, idx):
    start, stop, _ = (idx[0] if idx else slice(None)).indices(shapes[key].shape[0])
    return by_start[(start, stop)][key][(slice(None),) + tuple(idx[1:])]

  return {key: jax.make_array_from_callback(shape.shape, shardings[key], lambda idx, key=key: part(key, idx))
          for key, shape in shapes.items()}


def global_batch(task: Task, split: str, example_ids: np.ndarray, shapes: dict, shardings: dict,
                 perm: np.ndarray | None = None) -> dict:
  """One batch made on the spot (no read-ahead): for a single batch such as `prepare`'s."""
  ranges = local_row_ranges(shapes, shardings)
  return assemble(HostRows(task, split, lambda s: example_ids, ranges, perm)(0), shapes, shardings)


class BatchStream:
  """Batches `first, first+1, ..., stop-1` of `id_batches`, produced ahead by grain.

  Iterating yields global batches in order; `wait_seconds` accumulates the time the
  caller spent blocked on the next batch (0 when the pipeline keeps ahead)."""

  def __init__(self, task: Task, split: str, id_batches, first: int, stop: int, shapes: dict, shardings: dict,
               perm: np.ndarray | None = None, *, threads: int = 2, prefetch: int = 4, workers: int = 0):
    self.shapes, self.shardings = shapes, shardings
    rows = HostRows(task, split, id_batches, local_row_ranges(shapes, shardings), perm)
    ds = grain.MapDataset.range(first, stop).map(rows)
    if workers > 0:
      # grain's worker processes read absl flags, which seqmix's own command line does not parse.
      from absl import flags  # noqa: PLC0415
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      # Worker w makes elements w, w+W, ...; the order is kept. Each worker reads ahead
      # `prefetch` elements of its own.
      it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                             per_worker_buffer_size=max(prefetch, 1)))
    else:
      it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 0), prefetch_buffer_size=max(prefetch, 0)))
    self._it = iter(it_ds)
    self.wait_seconds = 0.0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    t = time.perf_counter()
    host = next(self._it)
    self.wait_seconds += time.perf_counter() - t
    return assemble(host, self.shapes, self.shardings)

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
    self._it = iter(())


def train_example_ids(step: int, batch_size: int) -> np.ndarray:
  return np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)


def eval_example_ids(num_examples: int, batch_size: int) -> list[np.ndarray]:
  """Held-out examples [0, n) rounded up to whole batches (a finite split's rows past its
  end are fillers that carry no weight)."""
  n = math.ceil(num_examples / batch_size) * batch_size
  return [np.arange(i, i + batch_size, dtype=np.int64) for i in range(0, n, batch_size)]
