"""The task registry: `task.name` -> Task class (the one place task names resolve)."""

from __future__ import annotations

from trainer.data.base import DataError, Task
from trainer.data.induction import Induction
from trainer.data.listops import ListOps
from trainer.data.mqar import MQAR
from trainer.data.packing import PackedTask
from trainer.data.pathfinder import Pathfinder
from trainer.data.retrieval import AANRetrieval
from trainer.data.selective_copy import SelectiveCopy
from trainer.data.text import PydocText
from trainer.data.textdir import TextDir
from trainer.data.tfds_task import TfdsTask

TASKS: dict[str, type[Task]] = {
    "text": PydocText,
    "listops": ListOps,
    "mqar": MQAR,
    "selective_copy": SelectiveCopy,
    "induction": Induction,
    "tfds": TfdsTask,
    "textdir": TextDir,
    "retrieval": AANRetrieval,
    "pathfinder": Pathfinder,
}


def make_task(task_cfg, seed: int, eval_examples: int = 0, batch_size: int = 1) -> Task:
  """Builds the task named by `task_cfg.name` from its settings sub-dict.

  `task_cfg` has `name`, `seq_len` and one sub-dict per task (e.g. `task_cfg.listops`)
  holding that task's own settings. With `task_cfg.packing`, rows pack several examples
  (trainer/data/packing.py); `eval_examples` is how many held-out examples they cover
  and `batch_size` the rows packed together.
  """
  name = task_cfg.name
  if name not in TASKS:
    raise DataError(f"task.name={name!r} is not a known task; valid names: {', '.join(sorted(TASKS))}")
  own = task_cfg.get(name, None)
  task = TASKS[name](seq_len=int(task_cfg.seq_len), seed=int(seed), **(dict(own) if own else {}))
  if task_cfg.get("packing", False):
    task = PackedTask(task, int(task_cfg.get("packing_window", 4)), eval_examples, batch_size)
  return task
