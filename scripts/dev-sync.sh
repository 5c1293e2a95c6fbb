#!/usr/bin/env bash
# Developer shortcut: copy the Python sources of slm_ros/ over the package installed in the venv
# (seconds, vs. a full rebuild by scripts/setup.sh). Interfaces (msg/, action/) and new executables
# still need scripts/setup.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SLM_ROS_VENV:-$here/.venv}"
dest="$(cd / && "$venv/bin/python" -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("slm_ros").origin))' 2>/dev/null || true)"
if [ -z "$dest" ] || [ "$dest" = "$here/slm_ros" ]; then
  echo "dev-sync: slm_ros is not installed in $venv; run scripts/setup.sh first" >&2
  exit 2
fi
(cd "$here/slm_ros" && find . -name '*.py' -o -name '*.json' | grep -v __pycache__ | while read -r f; do
  mkdir -p "$dest/$(dirname "$f")"; cp "$f" "$dest/$f"; done)
echo "dev-sync: slm_ros/ -> $dest"
