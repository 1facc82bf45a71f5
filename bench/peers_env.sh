#!/usr/bin/env bash
# Creates .venv-peers: the environment of the peer methods that this project's own environment cannot hold
# (syne-tune 0.14.2 requires numpy < 1.27, dehb 0.1.2 numpy < 2; the project pins numpy 2.4.6). bench/replay.py runs
# them in it as a subprocess (bench/peers_venv.py); lorahpo never imports them. Bench only: `make bench-peers`.
#
#   bash bench/peers_env.sh [DIR]        # DIR defaults to .venv-peers; 67-77 s here, downloads included
#
# The versions are bench/peers-lock.txt (its header says how it was made); Python 3.11 (python3.11, or $PYTHON311).
# `.installed` is written last: bench/peers_venv.py ignores an environment whose creation did not finish.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-peers}
python=${PYTHON311:-python3.11}
if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: $python not found: the peers' environment needs Python 3.11 (set PYTHON311=/path/to/python3.11)" >&2
  exit 2
fi
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-deps -r bench/peers-lock.txt
"$venv/bin/python" -m pip check
"$venv/bin/python" -c "import numpy, syne_tune, dehb; from syne_tune.optimizer import legacy_baselines"
cp bench/peers-lock.txt "$venv/.installed"
echo "created $venv: syne-tune==0.14.2, dehb==0.1.2 (bench/peers-lock.txt)"
