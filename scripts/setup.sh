#!/usr/bin/env bash
# Create .venv (if missing) and install the dependencies declared in pyproject.toml, with the test,
# deepspeed and sweeps extras.
# torch: an existing torch in .venv (e.g. a CUDA build) is kept; otherwise torch==2.13.0 is
# installed in the same command as everything else, so no package can pull a newer torch.
# uv is used when it is on PATH or installable (seconds); pip is the fallback (minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
PY=.venv/bin/python

[ -x "$PY" ] || python3 -m venv .venv

mapfile -t deps < <("$PY" - <<'PYEOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for dep in project["dependencies"] + extras["test"] + extras["deepspeed"] + extras["sweeps"]:
    if not dep.startswith("torch"):
        print(dep)
PYEOF
)

if have_torch=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
    torch_req="torch==$have_torch"
else
    torch_req="torch==$TORCH_VERSION"
fi

# uv ignores pip's config, so hand it pip's find-links (where the local CPU wheel lives).
find_links=$("$PY" -m pip config get global.find-links 2>/dev/null || true)
uv_args=()
[ -n "$find_links" ] && uv_args+=(--find-links "$find_links")

UV=$(command -v uv || true)
if [ -z "$UV" ]; then
    "$PY" -m pip install --quiet uv >/dev/null 2>&1 && UV=.venv/bin/uv || true
fi

if [ -n "$UV" ]; then
    "$UV" pip install --quiet --python "$PY" "${uv_args[@]}" "$torch_req" "${deps[@]}"
else
    "$PY" -m pip install --quiet "$torch_req" "${deps[@]}"
fi
"$PY" -c "import torch, transformers, peft, hydra; print(f'setup ok: torch {torch.__version__}, transformers {transformers.__version__}')"
