#!/usr/bin/env bash
# Check that installing gqa-convert next to a torch the user already has keeps that torch:
# makes a fresh venv at DIR (no system site packages), installs torch==VERSION into it, then
# `pip install -e .` with no constraint, and fails unless torch is still VERSION.
#   scripts/check_keeps_torch.sh DIR VERSION     (CI: the torch floor, in the lowest venv)
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 DIR TORCH_VERSION" >&2; exit 2; }
dir=$1 want=$2
cd "$(dirname "$0")/.."
python -m venv "$dir"
"$dir/bin/pip" install -q --progress-bar off "torch==$want"
before=$("$dir/bin/python" -c 'import torch; print(torch.__version__)')
"$dir/bin/pip" install -q --progress-bar off -e .
after=$("$dir/bin/python" -c 'import torch; print(torch.__version__)')
if [ "$before" != "$after" ] || [ "${after%%+*}" != "$want" ]; then
    echo "FAIL: torch $before was replaced by $after by pip install -e ." >&2
    exit 1
fi
echo "ok: torch $after kept by pip install -e . (gqa-convert $("$dir/bin/pip" show gqa-convert | sed -n 's/^Version: //p'))"
