#!/usr/bin/env bash
# Creates .venv with cliptune and every extra installed (`[all]`: search, export, shards, report,
# demo). `--dev` installs `[dev]`: all of that plus the test tools, and Debian's chromium for the
# browser test where it is missing (as root, with apt-get).
#
# torch comes first: on these machines `pip install torch==2.13.0` takes a CPU wheel already on disk;
# without it pip would resolve `torch` to a multi-GB CUDA build. A Python that already has torch
# (a GPU machine, a conda env) keeps its own: the venv then sees the system site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras="[all]"
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip >/dev/null
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0 \
    || "$py" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$py" -m pip install -q -e ".$extras"
if [ "$extras" = "[dev]" ] && [ ! -x /usr/bin/chromium ]; then
  # tests/test_browser.py drives Debian's chromium with Playwright (Playwright's own browser download
  # is not used). Setup never fails for want of it: the test then skips, or fails under CI=true.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "note: apt-get could not install chromium; tests/test_browser.py will skip (fail under CI=true)" >&2
  else
    echo "note: /usr/bin/chromium is missing (Debian: apt-get install chromium); tests/test_browser.py needs it" >&2
  fi
fi
echo "cliptune installed in .venv ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
