"""The CPU arena: 9 mixers x 4 tasks, sized for 2 CPU cores (under an hour, two cells at a time).

    python -m trainer.arena --config=configs/arena/cpu.py
    python -m trainer.arena --config=configs/arena/cpu.py --report     # tables and plots at any time

Tasks (all causal LMs at length 64-128, two layers of d=64, tied embeddings where the task's
own config ties them):
  mqar       Zoology's associative recall, 8 pairs among 64 tokens, vocab 256 (chance 1/128),
             a short conv in layer 0 and the mixer in layer 1 (the Mambas: both layers)
  selcopy    Mamba's selective copying, 8 tokens from 16 ids scattered in 64 (chance 1/16)
  induction  induction heads at length 64, vocab 16: the token after the trigger's first
             occurrence (chance 1/16)
  text       next byte of CPython's documentation, 128 bytes of context (chance: always a space)
Mixers: exact softmax (`attention`, and `flash`, the same function blockwise), a local window
of 16, a strided block-sparse pattern (blocks of 8: own, previous and every 4th block), three
linear-time attentions (`linear`, `sla`, `transnormer` with diagonal blocks of 16) and the two
Mambas. The windows are cut to the short lengths so that they matter: at the default sizes
every sparse mixer would see the whole row. `:smoke` is the same grid at a few steps (the
tests' size).
"""

TASKS = {
    "mqar": {"config": "configs/mqar.py", "set": [
        "task.seq_len=64", "task.mqar.num_pairs=8", "task.mqar.vocab_size=256", "model.d_model=64",
        "batch_size=64", "total_steps=600", "eval_every=150", "checkpoint_every=300", "eval_examples=256"]},
    "selcopy": {"config": "configs/selective_copy.py", "set": [
        "task.seq_len=64", "task.selective_copy.num_tokens=8", "total_steps=600", "eval_every=150",
        "checkpoint_every=300", "eval_examples=256"]},
    "induction": {"config": "configs/induction.py", "set": [
        "task.seq_len=64", "batch_size=64", "total_steps=600", "eval_every=150", "checkpoint_every=300",
        "eval_examples=256"]},
    "text": {"config": "configs/default.py", "set": [
        "model.num_layers=2", "model.d_model=64", "model.num_heads=2", "model.num_kv_heads=2", "total_steps=300",
        "eval_every=100", "checkpoint_every=150"]},
}

MIXERS = {
    "attention": {},
    "flash": {},
    "local": {"set": ["model.local.window=16"]},
    "block_sparse": {"set": ["model.block_sparse.block=8", "model.block_sparse.pattern=strided",
                             "model.block_sparse.stride=4"]},
    "linear": {},
    "sla": {},
    "transnormer": {"set": ["model.transnormer.block=16"]},
    "mamba": {},
    "mamba2": {},
}


def get_config(arg=None):
  a = {"name": "cpu", "tasks": TASKS, "mixers": MIXERS, "seeds": [0], "parallel": 2, "threshold": 0.9,
       "baseline": "attention", "memory": {"task": "text", "lengths": [256, 1024, 4096]}}
  if arg == "smoke":
    a["name"] = "cpu-smoke"
    a["set"] = ["total_steps=4", "eval_every=2", "checkpoint_every=2", "eval_examples=16", "batch_size=8"]
    a["memory"] = {"task": "text", "lengths": [64, 128]}
  elif arg:
    raise ValueError(f"configs/arena/cpu.py takes no argument or 'smoke', not {arg!r}")
  return a
