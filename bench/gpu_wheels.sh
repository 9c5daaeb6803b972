#!/bin/sh
# Prepares .whl/ (git-ignored through .git/info/exclude), the folder bench/gpu_check.sh installs on a
# lent GPU machine. That machine has Python 3.12 with CUDA torch, numpy, pyyaml, einops, tqdm,
# huggingface-hub, safetensors, packaging, wrapt and pytest, and no network; this fetches, here, the
# Python 3.12 wheels of everything else bench/gpu.py and services/separator/tests/test_gpu.py import,
# at the versions of this checkout's .venv (one version each), and records the commit they go with.
#
#   bench/gpu_wheels.sh        # needs internet; about 10 MB; then run bench/gpu_check.sh with carry [".whl"]
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
PACKAGES="demucs julius lameenc sphn soundfile cffi pycparser
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-instrumentation
  pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions"

platforms="--platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for n in $(seq 17 39); do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done

rm -rf "$DEST"
mkdir -p "$DEST"
pins=""
for name in $PACKAGES; do
    pins="$pins $name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
done
# shellcheck disable=SC2086 # word splitting of the lists is meant
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d "$DEST" $pins
git describe --always --dirty >"$DEST/COMMIT"
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1), for commit $(cat "$DEST/COMMIT") in $DEST/"
