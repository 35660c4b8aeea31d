"""The Long Range Arena grid: the LRA paper's efficient transformers x its five tasks (an accelerator job).

    python -m trainer.arena --config=configs/arena/lra.py --set task.tfds.data_dir=$HOME/tensorflow_datasets \
        --set task.retrieval.data_dir=.../lra_release/tsv_data [--launcher=slurm]

Tasks at the LRA settings of their configs: ListOps (generated), Text (IMDB bytes, a prepared
TFDS data set), Retrieval (the LRA release's AAN files), Image (CIFAR-10 grey levels, TFDS) and
Pathfinder 32 x 32 (generated); Path-X is `configs/lra_pathfinder.py:pathx`, left out as in the
LRA paper's average. Mixers: the LRA paper's Table 1 rows that seqmix has (exact attention, local,
Sparse Transformer, Longformer, Linformer, Reformer, Sinkhorn, Synthesizer, BigBird, Linear
Transformer, Performer) plus the later linear-time and state-space mixers. Each cell is a long run
(hours on one GPU); `parallel` is 1 (one cell per GPU) and `--launcher=slurm` spreads the cells over
a cluster. Until the data are prepared, `--tasks=listops,pathfinder` runs the generated two.
`:small` uses the configs' `:small` sizes; `:smoke` the seconds-long ones (the tests' size: the
grid's configs must all load).
"""

LRA_MIXERS = ("attention", "local", "sparse_transformer", "longformer", "linformer", "reformer", "sinkhorn",
              "synthesizer", "bigbird", "linear", "performer")
LATER_MIXERS = ("flash", "sla", "transnormer", "mamba", "mamba2")


def get_config(arg=None):
  if arg not in (None, "small", "smoke"):
    raise ValueError(f"configs/arena/lra.py takes no argument, 'small' or 'smoke', not {arg!r}")
  size = f":{arg}" if arg else ""
  tasks = {
      "listops": {"config": f"configs/listops.py{size}"},
      "text": {"config": f"configs/lra_text.py{size}"},
      "retrieval": {"config": f"configs/lra_retrieval.py{size}"},
      "image": {"config": f"configs/lra_image.py{size}"},
      "pathfinder": {"config": f"configs/lra_pathfinder.py{size}"},
  }
  return {"name": "lra" + (f"-{arg}" if arg else ""), "tasks": tasks,
          "mixers": {m: {} for m in LRA_MIXERS + LATER_MIXERS}, "seeds": [0], "parallel": 1, "threshold": 0.6,
          "baseline": "attention", "memory": {"task": "listops", "lengths": [1024, 2048, 4096, 8192]}}
