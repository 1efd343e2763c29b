#!/usr/bin/env bash
# Set up the environment, rewrite the bundled demo model, print the report and write out/demo.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh base
exec .venv/bin/rewrite apply rewrite.demo:default_model --passes "${PASSES:-fold_bn,fuse_branches,remove_residual,cleanup}" \
    --input-shape 2,3,64,64 --verify -o out/demo.pt --report-json out/demo-report.json
