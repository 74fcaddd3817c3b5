#!/bin/sh
# Fidelity of asynchronous denoising on the bundled digits model; results in README.md here.
# Usage (from the repository root): sh benchmarks/fidelity/run.sh [extra eval options]
set -e
OMP_NUM_THREADS=1 exec .venv/bin/asyncdiff-partition --threads 1 eval --model digits \
    --segments 2,3,4 --stride 1,2 --warmup 0,1,3,5 --steps 20 --images 20 \
    --out benchmarks/fidelity/results "$@"
