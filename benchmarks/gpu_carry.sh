#!/usr/bin/env bash
# Pack what `make gpu-bench` needs on a lent GPU machine that has no package registry and takes at
# most 64 MiB per call: a trimmed llama.cpp source (the llama-cpp-python sdist's vendor/llama.cpp,
# 73 MiB whole) with its HF -> GGUF converter, and the bitsandbytes wheel cut to its CUDA 13 kernels.
#
#   bash benchmarks/gpu_carry.sh OUTDIR        (default .devcarry; then carry OUTDIR to the GPU)
#
# Kept: CMake files, ggml/ (minus the backends that are off: Metal, Vulkan, SYCL, OpenCL, ...),
# src/, include/, common/, vendor/ (minus miniaudio, unused by the two tools), tools/llama-bench
# and tools/quantize (tools/CMakeLists.txt rewritten to add only those), convert_hf_to_gguf.py
# with conversion/ and gguf-py/. Result: llama.cpp.tar.gz of about 6 MiB, bitsandbytes ~20 MiB.
set -euo pipefail
OUT=${1:-.devcarry}
VERSION=0.3.36                    # = llama-cpp-python in requirements/base.txt
BNB=0.50.2                        # = bitsandbytes in requirements/base.txt
CUDA_TAG=cuda130                  # the GPU image's torch is cu130
PY=${PY:-python3}                 # any pip, for the downloads
VENV_PY=${VENV_PY:-.venv/bin/python}  # the project's venv, for the tokenizer
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"

"$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$work"
tar -xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
dst="$work/llama.cpp"
mkdir -p "$dst/tools" "$dst/ggml/src"
cp -r "$src"/{CMakeLists.txt,cmake,common,src,include,vendor,licenses,LICENSE} "$dst/"
cp -r "$src"/{convert_hf_to_gguf.py,conversion,gguf-py} "$dst/"
rm -rf "$dst/vendor/miniaudio" "$dst/gguf-py/tests" "$dst/gguf-py/examples"
sed -i '/add_subdirectory(miniaudio)/d' "$dst/vendor/CMakeLists.txt"
cp -r "$src/ggml/CMakeLists.txt" "$src/ggml/cmake" "$src/ggml/include" "$dst/ggml/"
for f in "$src"/ggml/src/*; do
  case "$(basename "$f")" in
    ggml-metal|ggml-vulkan|ggml-sycl|ggml-opencl|ggml-hexagon|ggml-et|ggml-cann|ggml-openvino|\
    ggml-webgpu|ggml-virtgpu|ggml-zdnn|ggml-zendnn) ;;
    *) cp -r "$f" "$dst/ggml/src/" ;;
  esac
done
cp -r "$src/tools/llama-bench" "$src/tools/quantize" "$dst/tools/"
cat > "$dst/tools/CMakeLists.txt" <<'CMAKE'
# trimmed by benchmarks/gpu_carry.sh: only the tools the GPU bench runs
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(quantize)
CMAKE
tar -czf "$OUT/llama.cpp.tar.gz" -C "$work" llama.cpp

# bitsandbytes: keep the CUDA 13.0 kernel library and the CPU one; drop the other CUDA, ROCm, XPU builds
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$work/whl" "bitsandbytes==$BNB"
mkdir -p "$work/bnb"
(cd "$work/bnb" && unzip -q "$work"/whl/bitsandbytes-*.whl)
find "$work/bnb/bitsandbytes" -name 'libbitsandbytes_*' ! -name "*_${CUDA_TAG}.so" ! -name '*_cpu.so' -delete
rm -f "$OUT/bitsandbytes.tar.gz"
tar -czf "$OUT/bitsandbytes.tar.gz" -C "$work/bnb" .
# SmolLM2's tokenizer (from the embedded GGUF): llama.cpp's converter needs one for the
# random-weight checkpoints, and pads it to each shape's vocabulary size
rm -rf "$OUT/tokenizer"
PYTHONPATH=src "$VENV_PY" -c "
import sys
from omegaconf import OmegaConf
from quantpipe.base import embedded_gguf, gguf_tokenizer
cfg = OmegaConf.load('conf/model/smollm2.yaml').embedded
gguf_tokenizer(embedded_gguf(cfg)).save_pretrained(sys.argv[1])" "$OUT/tokenizer"
du -sh "$OUT"/*
