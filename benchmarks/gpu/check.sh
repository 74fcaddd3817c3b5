#!/usr/bin/env bash
# The device check in one command (README.md): install the carried wheels, then run check.py.
#
#   bash benchmarks/gpu/check.sh                             # the GPU machine: wheels from .whl/, CUDA, figures to $OUT
#   bash benchmarks/gpu/check.sh --no-install --device cpu --small --out out/gpu-check   # rehearsal here
#
# --no-install: use the python whose asyncdiff_partition is already importable (no wheels).
# Every other option goes to check.py (--device, --small, --out, --steps, --no-compile, --budget-s, ...).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
install=1
args=()
for arg in "$@"; do
  case "$arg" in
    --no-install) install=0 ;;
    *) args+=("$arg") ;;
  esac
done

if [ "$install" = 1 ]; then
  site="${SITE:-/tmp/site}"
  # Carried wheels the image already has a distribution of are left out (never shadow the image's
  # torch stack); diffusers and this project are always installed.
  mapfile -t wheels < <("$python" - "$root/.whl" <<'PY'
import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = wheel.name.split("-")[0]
    if dist.lower().replace("_", "-") not in ("diffusers", "asyncdiff-partition"):
        try:
            md.version(dist)
            print(f"  in the image already: {dist}", file=sys.stderr)
            continue
        except md.PackageNotFoundError:
            pass
    print(wheel)
PY
  )
  if [ "${#wheels[@]}" = 0 ]; then
    echo "error: no wheels in $root/.whl; run benchmarks/gpu/prepare.sh first (or pass --no-install)" >&2
    exit 1
  fi
  echo "installing ${#wheels[@]} wheels into $site: ${wheels[*]##*/}"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/asyncdiff-inductor}"
exec "$python" "$here/check.py" --out "${OUT:-$root/out/gpu-check}" "${args[@]}"
