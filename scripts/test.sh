#!/usr/bin/env bash
# Run the slm_ros test suite on a fresh machine: sets up (idempotent, see scripts/setup.sh), then runs
# pytest against the installed package. Extra arguments go to pytest.
#
#   scripts/test.sh              # everything
#   scripts/test.sh -k core      # a subset
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SLM_ROS_VENV:-$here/.venv}"

# Every ROS process the tests start stays on this machine; each test reserves its own domain id.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-0}"
export PYTHONUNBUFFERED=1

bash "$here/scripts/setup.sh"
# The pytest console script (not `python -m pytest`) keeps the source tree off sys.path, so the
# installed package with its generated msg/action modules is the one imported.
cd "$here"
exec "$venv/bin/pytest" -p no:cacheprovider "$here/test" "$@"
