#!/usr/bin/env bash
# Install size and time of each optional extra, on top of the base install, in fresh venvs:
#   A: base -> tl -> sae -> nnsight;  B: base -> tl4 -> nnsight.
# Usage: scripts/measure_extras.sh [workdir]  (prints one line per step; removes its venvs)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d /tmp/gqa-convert-extras.XXXXXX)}
trap 'rm -rf "$work"' EXIT
step() {  # venv, label, extras
    local start=$SECONDS before after
    before=$(du -sm "$1" | cut -f1)
    "$1/bin/pip" install -q --progress-bar off -c .ci/constraints.txt -e ".[$3]" 2>/dev/null
    after=$(du -sm "$1" | cut -f1)
    echo "$2: +$((after - before)) MB, $((SECONDS - start)) s (venv now ${after} MB)"
}
for v in A B; do python -m venv "$work/$v"; done
step "$work/A" "base (dev)" dev
step "$work/A" "tl" dev,tl
step "$work/A" "sae (after tl)" dev,tl,sae
step "$work/A" "nnsight (after tl, sae)" dev,tl,sae,nnsight
step "$work/B" "base (dev)" dev
step "$work/B" "tl4" dev,tl4
step "$work/B" "nnsight (after tl4)" dev,tl4,nnsight
