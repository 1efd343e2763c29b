#!/usr/bin/env bash
# Create .venv (once) and install the project with the given extras. Re-runs are quick: the install
# is skipped while pyproject.toml and the extras are unchanged. pip's output goes to .venv/pip.log
# and is shown only if an install fails.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.rewrite-installed-$(sha1sum pyproject.toml | cut -c1-12)-${extras//,/_}"
pip_install() {
    if ! .venv/bin/python -m pip install --quiet "$@" >> .venv/pip.log 2>&1; then
        cat .venv/pip.log >&2
        echo "setup: pip install $* failed (log above)" >&2
        exit 1
    fi
}
if [ ! -f "$stamp" ]; then
    echo "setup: installing into .venv (torch 2.14.1 from this machine's disk, then the project with [$extras])"
    pip_install --upgrade pip
    # torch first, pinned: this machine serves these builds from its own disk.
    pip_install "torch==2.14.1" "torchvision==0.29.1"
    # The package itself asks only for torch>=2.1 (users elsewhere have newer torch); here the pin holds.
    printf 'torch==2.14.1\ntorchvision==0.29.1\n' > .venv/torch-pin.txt
    pip_install -e ".[${extras}]" -c .venv/torch-pin.txt
    touch "$stamp"
fi
