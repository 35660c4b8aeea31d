"""The two recall papers' difficulty sweeps as arenas (accelerator jobs).

    python -m trainer.arena --config=configs/arena/difficulty.py:mqar
    python -m trainer.arena --config=configs/arena/difficulty.py:selcopy

`:mqar`, Zoology's figure: MQAR at sequence lengths 64, 128, 256 and 512 with L/4 key-value pairs
(vocab 8192), each at model widths 64, 128, 256 and 512 (16 tasks, `mqar-L<len>-d<width>`), a
short conv in front of the mixer (both layers the mixer for the Mambas), and Zoology's learning
rate sweep per mixer (the table keeps each mixer's best by validation). The mixers: exact
attention, the linear-time attentions and the two Mambas.
`:selcopy`, the Mamba paper's: selective copying of 16 tokens at lengths 256 to 4096
(`selcopy-L<len>`). `:smoke` after either (`:mqar-smoke`) is the seconds-long version the tests load.
"""

MQAR_MIXERS = ("attention", "linear", "sla", "transnormer", "performer", "mamba", "mamba2", "conv")
SELCOPY_MIXERS = ("attention", "linear", "sla", "mamba", "mamba2")


def get_config(arg=None):
  kind, _, smoke = (arg or "").partition("-")
  if kind not in ("mqar", "selcopy") or smoke not in ("", "smoke"):
    raise ValueError(f"configs/arena/difficulty.py takes 'mqar', 'selcopy', 'mqar-smoke' or 'selcopy-smoke', "
                     f"not {arg!r}")
  size = ":smoke" if smoke else ""
  if kind == "mqar":
    tasks = {f"mqar-L{n}-d{d}": {"config": f"configs/mqar.py{size}", "set": [
        f"task.seq_len={n}", f"task.mqar.num_pairs={n // 4}", f"model.d_model={d}"]}
        for n in (64, 128, 256, 512) for d in (64, 128, 256, 512)}
    return {"name": "difficulty-mqar" + ("-smoke" if smoke else ""), "tasks": tasks,
            "mixers": {m: {} for m in MQAR_MIXERS}, "grid": {"optimizer.learning_rate": [3e-4, 1e-3, 3e-3]},
            "parallel": 4, "threshold": 0.9}
  tasks = {f"selcopy-L{n}": {"config": f"configs/selective_copy.py{size}", "set": [f"task.seq_len={n}"]}
           for n in (256, 512, 1024, 2048, 4096)}
  return {"name": "difficulty-selcopy" + ("-smoke" if smoke else ""), "tasks": tasks,
          "mixers": {m: {} for m in SELCOPY_MIXERS}, "parallel": 4, "threshold": 0.9}
