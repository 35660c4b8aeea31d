"""Recall, copying and induction for every causal mixer (an accelerator job).

    python -m trainer.arena --config=configs/arena/recall.py [--parallel=N] [--grid optimizer.learning_rate=1e-3,3e-3]

Tasks at their configs' sizes: MQAR (`configs/mqar.py`: Zoology's L=256, 16 pairs, vocab 8192, a short
conv in front of the mixer, both layers the mixer for the Mambas), selective copying
(`configs/selective_copy.py`: 16 tokens in 256) and induction heads (`configs/induction.py`, trained
at 256; `scripts/eval_lengths.py` then evaluates each cell at longer lengths). Every mixer with a
causal form; `linformer` is bidirectional only and left out. `xattention` runs with blocks of 16
(at its default 128 all of MQAR's pairs sit in the always-kept first block). Learning rates: add
`--grid optimizer.learning_rate=...` for Zoology's best-of-sweep protocol. `:smoke` is the
seconds-long version (the tests load it).
"""

CAUSAL = ("attention", "flash", "local", "bigbird", "block_sparse", "xattention", "sparse_transformer",
          "longformer", "combiner", "swin", "linear", "performer", "transnormer", "sla", "ecoformer", "reformer",
          "sinkhorn", "synthesizer", "mamba", "mamba2", "conv", "lmu")


def get_config(arg=None):
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/arena/recall.py takes no argument or 'smoke', not {arg!r}")
  size = ":smoke" if arg else ""
  mixers = {m: {} for m in CAUSAL}
  mixers["xattention"] = {"set": ["model.xattention.block=16"]}
  return {"name": "recall" + ("-smoke" if arg else ""),
          "tasks": {"mqar": {"config": f"configs/mqar.py{size}"},
                    "selcopy": {"config": f"configs/selective_copy.py{size}"},
                    "induction": {"config": f"configs/induction.py{size}"}},
          "mixers": mixers, "seeds": [0], "parallel": 4, "threshold": 0.9, "baseline": "attention",
          "memory": {"task": "mqar", "lengths": [256, 1024, 4096, 16384]}}
