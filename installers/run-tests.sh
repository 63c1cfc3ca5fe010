#!/usr/bin/env bash
# Set up the test environment (.venv-test, kept apart from the app's .venv so a CUDA torch there is
# never replaced) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${VIDEO_TRAINER_PYTHON:-python3}
venv=.venv-test
# Reinstall only when what the install depends on changed.
fingerprint=$(cat pyproject.toml constraints/test-cpu.txt | sha256sum | cut -d' ' -f1)
stamp="$venv/.installed-$fingerprint"

if [ ! -f "$stamp" ]; then
    echo "Setting up the test environment in $venv (a few minutes the first time)..."
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # The constraints file pins the CPU build of torch; other versions pull GBs of CUDA packages.
    "$venv/bin/python" -m pip install --quiet -c constraints/test-cpu.txt -e ".[test]"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi

export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
export HF_HUB_OFFLINE=1
exec "$venv/bin/python" -m pytest "$@"
