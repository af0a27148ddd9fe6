#!/bin/sh
# Set up a development environment on a fresh Debian machine with Python 3.11+:
# the Debian packages the tests and the demo use, then .venv with the project
# and its development tools (just, pytest, grpcio, mypy, ruff...). Idempotent.
set -eu
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
need_apt=""
"$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null ||
    { echo "bootstrap: Python 3.11 or newer is required ($PY)" >&2; exit 1; }
"$PY" -c 'import ensurepip, venv' 2>/dev/null || need_apt="$need_apt python3-venv"
command -v unshare >/dev/null 2>&1 || need_apt="$need_apt util-linux"
command -v openssl >/dev/null 2>&1 || need_apt="$need_apt openssl"
if [ -n "$need_apt" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap: install these Debian packages first (as root):$need_apt" >&2
        exit 1
    fi
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need_apt
fi

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
echo "bootstrap: .venv ready ($(.venv/bin/python --version), $(.venv/bin/just --version))"
