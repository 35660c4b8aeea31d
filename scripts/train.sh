#!/usr/bin/env bash
# Trains a config (default: configs/default.py into runs/default). Run again to resume.
# Extra arguments go to `python -m trainer.train`, e.g. --config=configs/mqar.py --workdir=runs/mqar
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
has_config=0; has_workdir=0
for a in "$@"; do
  case "$a" in --config=*|--config) has_config=1 ;; --workdir=*|--workdir) has_workdir=1 ;; esac
done
args=()
[ "$has_config" = 1 ] || args+=(--config=configs/default.py)
[ "$has_workdir" = 1 ] || args+=(--workdir=runs/default)
exec python -m trainer.train "${args[@]}" "$@"
