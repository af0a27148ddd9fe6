# trio-spirecsi developer commands. Run `scripts/bootstrap.sh` once first (or
# `scripts/bootstrap.sh demo` for the demo alone; the README's commands do it for you).

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv/bin"

# Show the recipes
default:
    @just --list

# Install the project and its development tools into .venv (silent when done already)
setup:
    @scripts/bootstrap.sh

# Install only what the demo needs: runtime dependencies and just
setup-demo:
    @scripts/bootstrap.sh demo

# Dev agent + driver in a temporary folder: publish, show the files, rotate, unpublish
demo: setup-demo
    @{{venv}}/trio-spirecsi demo

# The whole test suite (in a private mount namespace, one worker per core, at most 4), then lint and types
test: setup
    unshare -m --propagation private {{venv}}/pytest -q -p no:cacheprovider -n auto --maxprocesses 4
    {{just_executable()}} check

# ruff and mypy --strict
check:
    {{venv}}/ruff check .
    {{venv}}/ruff format --check .
    {{venv}}/mypy

# Regenerate trio_spirecsi/_proto from protos/
protos:
    {{venv}}/python scripts/gen_protos.py

# Benchmarks (not tests): publish latency, memory per volume, rotation and resume times
bench *ARGS: setup
    unshare -m --propagation private {{venv}}/python -m benchmarks.bench {{ARGS}}

# Bulk publishing of two drivers side by side, alternating rounds: BEFORE_DIR AFTER_DIR [--rounds N]
bench-bulk *ARGS: setup
    unshare -m --propagation private {{venv}}/python -m benchmarks.bulk_ab {{ARGS}}

# Hostile pods against the driver process: RSS, Probe, victim rotation, fds per attack (measured)
hostile *ARGS: setup
    unshare -m --propagation private {{venv}}/python -m benchmarks.hostile {{ARGS}}

# The fast layer alone: registry, volumes and the fast state machine in virtual time (no root)
fast *ARGS: setup
    {{venv}}/pytest -q -p no:cacheprovider tests/test_registry_fast.py tests/test_state_machine_fast.py tests/regressions/test_fast_state_machine_regressions.py {{ARGS}}

# Both state machines under the long hypothesis profile (minutes to hours)
soak *ARGS: setup
    HYPOTHESIS_PROFILE=long unshare -m --propagation private {{venv}}/pytest -q -p no:cacheprovider tests/test_state_machine_fast.py tests/test_state_machine.py {{ARGS}}

# Deliberately broken copies of the code against the fast tests that must catch them
mutants *ARGS: setup
    {{venv}}/python scripts/mutants.py {{ARGS}}

# Run every atheris fuzz target for SECONDS each
fuzz SECONDS="60": setup
    {{venv}}/python fuzz/run_all.py {{SECONDS}}
