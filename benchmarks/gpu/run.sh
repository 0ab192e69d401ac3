#!/usr/bin/env bash
# The GPU suite's one entry point: installs the carried wheels, runs `pytest -m gpu`, then the distillation,
# KD-loss, importance and eval measurements, and prints a summary (benchmarks/gpu/suite.py says what each
# step does). Exit status 0 only if every step finished and every test passed.
#
#   bash benchmarks/gpu/fetch_wheels.sh                 # once, where pip can reach PyPI (fills .whl/)
#   bash benchmarks/gpu/run.sh --bundle "$OUT"          # on the GPU machine: ~8 minutes on an H200
#   bash benchmarks/gpu/run.sh --device cpu --small     # the CPU rehearsal: same steps, toy shapes
#
# Options: --out DIR (results folder), --bundle DIR (results.tgz + summary.md + run.log, kept up to date),
# --only STEP,... (wheels, tests, distill, kd, importance, eval), --budget SECONDS (all steps; default 480).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" benchmarks/gpu/suite.py "$@"
