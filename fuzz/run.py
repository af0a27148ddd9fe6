"""Run one fuzz target under atheris (libFuzzer): ``python -m fuzz.run <target> [libFuzzer args]``.

From the repository root. The project's modules are instrumented for coverage before the
target is imported. Typical arguments: a scratch corpus folder first (new inputs are written
there), then ``fuzz/corpus/<target>`` (read only), ``-max_total_time=60``,
``-artifact_prefix=fuzz/crashes/<target>-``. ``fuzz/run_all.py`` passes all of these.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> None:
    import atheris

    if len(argv) < 2:
        raise SystemExit("usage: python -m fuzz.run <target> [libFuzzer arguments]")
    name = argv[1]
    logging.disable(logging.CRITICAL)  # the handler logs every refused request
    with atheris.instrument_imports(include=["trio_spirecsi", "fuzz"]):
        from fuzz.targets import load

        target = load(name)

    def one_input(data: bytes) -> None:
        target(data)

    atheris.Setup([argv[0], *argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
