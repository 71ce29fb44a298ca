#!/usr/bin/env bash
# llama-cpp-python for the GGUF tests, from a wheel cache: WHEELS (argument 1) keeps
#   llama_cpp_python-<V>-*.whl  built from the sdist with `pip wheel` (cmake + the machine's C/C++ compiler, CPU
#                               only, tuned for this machine: about 6-12 minutes on 2 cores, once per cache), and
#   llama.cpp-<V>/              llama.cpp's convert_hf_to_gguf.py with its conversion/ package and the gguf-py it
#                               was written against, extracted from the same sdist (the tests find it through
#                               ADAPTKIT_LLAMA_CPP_DIR, so nothing is fetched at test time).
# Then installs the wheel (its few pure-Python dependencies come from the registry).
set -euo pipefail
V=0.3.36
WHEELS="$1"
CONVERTER="$WHEELS/llama.cpp-$V"
SDIST="$WHEELS/sdist/llama_cpp_python-$V.tar.gz"
mkdir -p "$WHEELS"
have_wheel() { compgen -G "$WHEELS/llama_cpp_python-$V-*.whl" >/dev/null; }
if ! have_wheel || [ ! -f "$CONVERTER/convert_hf_to_gguf.py" ]; then
  [ -f "$SDIST" ] || pip download -q --no-deps --no-binary :all: "llama-cpp-python==$V" -d "$WHEELS/sdist"
fi
if [ ! -f "$CONVERTER/convert_hf_to_gguf.py" ]; then
  rm -rf "$CONVERTER.tmp" && mkdir -p "$CONVERTER.tmp"
  src="llama_cpp_python-$V/vendor/llama.cpp"
  tar xzf "$SDIST" -C "$CONVERTER.tmp" --strip-components=3 \
    "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE"
  rm -rf "$CONVERTER" && mv "$CONVERTER.tmp" "$CONVERTER"
fi
if ! have_wheel; then
  start=$(date +%s)
  pip wheel -q --no-deps "$SDIST" -w "$WHEELS"
  echo "llama-cpp-python $V built in $(( $(date +%s) - start )) s"
fi
rm -rf "$WHEELS/sdist"
pip install -q --find-links "$WHEELS" "llama-cpp-python==$V"
