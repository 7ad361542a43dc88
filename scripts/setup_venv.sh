#!/usr/bin/env bash
# Create .venv/ at the repository root if it is missing, with every dependency pinned.
# torch goes first from constraints.txt (the CPU wheel on this machine; on a CUDA machine pip picks
# the CUDA build of the same version), and the constraints keep other packages from replacing it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed-$(cat "$root/requirements.txt" "$root/constraints.txt" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setting up $venv (about a minute)..." >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install -q -r "$root/constraints.txt"
"$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -r "$root/requirements.txt"
rm -f "$venv"/.installed-*
touch "$stamp"
