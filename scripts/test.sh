#!/usr/bin/env bash
# Runs the CPU test suite on 8 fake CPU devices (tests/conftest.py sets them up), in
# $SEQMIX_TEST_WORKERS pytest-xdist processes (default: the number of cores, at most 4; each
# process compiles on its own, so two workers on two cores take ~18 min against ~25 for one).
# Extra arguments go to pytest and win over these, e.g. ./scripts/test.sh -k checkpoint -x -n 0
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cores="$(nproc 2>/dev/null || echo 1)"
workers="${SEQMIX_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
(( workers > 1 )) || workers=0  # one process, no xdist workers
exec python -m pytest -n "$workers" --dist worksteal "$@"
