#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity,
# llama-bench) from the llama-cpp-python source distribution pinned in requirements/base.txt,
# so the tools are the same llama.cpp the pipeline runs through llama-cpp-python.
#
#   bash scripts/build_llama_tools.sh VENV OUTDIR        (make tools: .venv build/llama.cpp)
#
# The sdist (pip download, cached by pip) vendors llama.cpp under vendor/llama.cpp with tools/.
# We configure that tree on its own, with the same ggml defaults the wheel was built with
# (GGML_NATIVE=ON i.e. -march=native, OpenMP), but static libraries so the binaries in
# OUTDIR/bin stand alone. About 4-5 minutes on 2 cores. Idempotent: a finished build with the
# same version is kept; delete OUTDIR to rebuild.
set -euo pipefail

VENV=${1:?usage: build_llama_tools.sh VENV OUTDIR}
OUTDIR=${2:?usage: build_llama_tools.sh VENV OUTDIR}
VERSION=0.3.36                      # keep equal to llama-cpp-python in requirements/base.txt
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-bench)
JOBS=${JOBS:-2}

stamp="$OUTDIR/bin/.llama-cpp-python-$VERSION"
built() {
  [[ -f "$stamp" ]] || return 1
  for t in "${TOOLS[@]}"; do [[ -x "$OUTDIR/bin/$t" ]] || return 1; done
}
if built; then
  echo "llama.cpp tools $VERSION already built in $OUTDIR/bin"
  exit 0
fi

src_root=build/src
mkdir -p "$src_root" "$OUTDIR/bin"
sdist="$src_root/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
  # --no-binary: the source distribution, which carries vendor/llama.cpp (pip caches it)
  "$VENV/bin/python" -m pip download -q --no-binary :all: --no-deps \
    "llama-cpp-python==$VERSION" -d "$src_root"
fi
src="$src_root/llama_cpp_python-$VERSION"
if [[ ! -d "$src/vendor/llama.cpp/tools" ]]; then
  tar -xzf "$sdist" -C "$src_root"
fi

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
build="$OUTDIR/cmake-build"
# LLAMA_CURL is deprecated in this llama.cpp (it warns); downloads are off with LLAMA_OPENSSL=OFF
cmake -S "$src/vendor/llama.cpp" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON
cmake --build "$build" --config Release --target "${TOOLS[@]}" -j "$JOBS"

for t in "${TOOLS[@]}"; do
  install -m 755 "$build/bin/$t" "$OUTDIR/bin/$t"
done
touch "$stamp"
echo "llama.cpp tools $VERSION in $OUTDIR/bin: ${TOOLS[*]}"
