#!/usr/bin/env bash
# Build and install llama-cpp-python for the instruction sets of this machine's CPU.
#
# usage: scripts/llama-build.sh PIP VERSION
#        scripts/llama-build.sh --print-args     (the CMake options it would use here; CPUINFO=file to ask
#                                                 about another CPU)
#
# llama.cpp's own `-march=native` build turns AMX on where the CPU has it, and that build segfaults on its
# first matrix product with Debian 12's GCC; `GGML_NATIVE=OFF` alone gives AVX2 only. So the CMake options
# are chosen here from /proc/cpuinfo: AVX-512 (with VBMI, VNNI, BF16) and AVX-VNNI when the CPU has them,
# never AMX; AVX2 otherwise. On 2 cores of a Xeon with AVX-512 this reads a prompt about 1.5 times as fast as
# the AVX2 build (BENCHMARKS.md, "Embedded LLM builds").
#
# A wheel built this way runs only on CPUs with the same instruction sets, so it is cached under a name that
# says which: ~/.cache/hugginggpt/wheels/<hash of the options>/. Another machine sharing the home directory
# builds its own. Set CMAKE_ARGS to choose the options yourself (e.g. -DGGML_NATIVE=OFF for a portable wheel).
set -euo pipefail
cmake_args() {
  local flags args
  flags=$(grep -m1 '^flags' "${CPUINFO:-/proc/cpuinfo}" 2>/dev/null || true)
  has() { [[ " $flags " == *" $1 "* ]]; }
  args="-DGGML_NATIVE=OFF"
  if has avx512f && has avx512bw && has avx512vl && has avx512dq && has avx512cd; then
    args+=" -DGGML_AVX512=ON"
    if has avx512vbmi; then args+=" -DGGML_AVX512_VBMI=ON"; fi
    if has avx512_vnni; then args+=" -DGGML_AVX512_VNNI=ON"; fi
    if has avx512_bf16; then args+=" -DGGML_AVX512_BF16=ON"; fi
  fi
  if has avx_vnni; then args+=" -DGGML_AVX_VNNI=ON"; fi
  echo "$args"
}

if [ "${1:-}" = "--print-args" ]; then
  cmake_args
  exit 0
fi
pip=$1
version=$2

# (the output is read whole first: grep -q stopping early would kill pip show, and pipefail reports that)
installed=$("$pip" show llama-cpp-python 2>/dev/null || true)
if grep -qx "Version: $version" <<<"$installed"; then
  exit 0
fi

if [ -z "${CMAKE_ARGS:-}" ]; then
  CMAKE_ARGS=$(cmake_args)
  export CMAKE_ARGS
fi

key=$(printf '%s %s' "$version" "$CMAKE_ARGS" | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/hugginggpt/wheels/$key"
wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "Building llama-cpp-python $version with CMAKE_ARGS='$CMAKE_ARGS' (5-10 minutes on 2 cores, once)"
  mkdir -p "$cache"
  # --no-cache-dir: pip's own wheel cache is keyed by the source, not by CMAKE_ARGS, and would hand back a
  # wheel built with other options.
  "$pip" wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python -w "$cache" "llama-cpp-python==$version"
  wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl | head -n1)
fi
"$pip" install -q --no-deps "$wheel"
