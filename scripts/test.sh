#!/usr/bin/env bash
# Runs the CPU test suite on 8 fake CPU devices (tests/conftest.py sets them up).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k checkpoint -x
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m pytest "$@"
