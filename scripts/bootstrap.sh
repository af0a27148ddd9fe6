#!/bin/sh
# Set up .venv on a fresh Debian machine with Python 3.11+. Idempotent, and silent when
# everything is already there.
#
#   scripts/bootstrap.sh        everything: the project, the test and development tools
#                               (pytest, grpcio, mypy, ruff, atheris...) and just; what
#                               `just test` and CI need
#   scripts/bootstrap.sh demo   only what `just demo` needs: the project's runtime
#                               dependencies and just
set -eu
cd "$(dirname "$0")/.."

mode=${1:-dev}
case "$mode" in
    dev) extras="dev" ;;
    demo) extras="demo" ;;
    *) echo "bootstrap: unknown mode '$mode'; use 'demo' or nothing (everything)" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
need_apt=""
"$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null ||
    { echo "bootstrap: Python 3.11 or newer is required ($PY)" >&2; exit 1; }
"$PY" -c 'import ensurepip, venv' 2>/dev/null || need_apt="$need_apt python3-venv"
command -v unshare >/dev/null 2>&1 || need_apt="$need_apt util-linux"
if [ "$mode" = dev ]; then
    command -v openssl >/dev/null 2>&1 || need_apt="$need_apt openssl"
fi
if [ -n "$need_apt" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap: install these Debian packages first (as root):$need_apt" >&2
        exit 1
    fi
    echo "bootstrap: installing Debian packages:$need_apt"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need_apt >/dev/null
fi

# A stamp per mode; "dev" includes everything "demo" installs.
stamp=.venv/.installed-$mode
done_already() {
    for s in "$stamp" .venv/.installed-dev; do
        if [ -f "$s" ] && [ ! pyproject.toml -nt "$s" ] && [ -x .venv/bin/just ]; then
            return 0
        fi
    done
    return 1
}
if done_already; then
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv"
    "$PY" -m venv .venv
fi
echo "bootstrap: installing the project with [$extras] into .venv (a minute or two)"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# setuptools warns about every editable install; nothing to act on here.
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
touch "$stamp"
echo "bootstrap: .venv ready ($(.venv/bin/python --version), $(.venv/bin/just --version))"
