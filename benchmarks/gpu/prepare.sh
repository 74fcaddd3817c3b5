#!/usr/bin/env bash
# Download / build the wheels the device check carries to the GPU machine into .whl/ (README.md).
# The GPU image has PyTorch with CUDA but not diffusers, and no network: everything else the
# check imports travels as wheels (CPython 3.12, manylinux x86_64), at most 64 MiB in all, at the
# versions this project's .venv runs (so the check runs what the tests ran). check.sh installs
# only the ones the image lacks (and always diffusers and the project).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
python="${PYTHON:-$root/.venv/bin/python}"
dest=.whl
mkdir -p "$dest"
rm -f "$dest"/*.whl

# .whl/ is ignored by git, so the device tool carries it only when named: carry [".whl"].
exclude="$(git rev-parse --path-format=absolute --git-common-dir)/info/exclude"
grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"

# What `import diffusers`, DDIMScheduler and this package's check path import (an import audit of
# check.py in .venv), minus torch and its own dependencies' stack that the image brings.
packages=(diffusers huggingface_hub safetensors regex importlib_metadata zipp requests urllib3 idna certifi
          charset_normalizer packaging tqdm click pyyaml hf-xet httpx2 httpcore2 h11 anyio sniffio truststore
          pillow numpy networkx filelock fsspec typing_extensions)
for pkg in "${packages[@]}"; do
  version="$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg" 2>/dev/null || true)"
  if [ -z "$version" ]; then
    echo "  not in $python's environment, not carried: $pkg" >&2
    continue
  fi
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "$pkg==$version"
done
"$python" -m pip wheel -q --no-deps -w "$dest" .   # the project itself
ls -l "$dest"
du -ch "$dest"/*.whl | tail -1
