"""Regenerate trio_spirecsi/_proto/ from protos/ (run with `just protos`).

protoc writes absolute imports (``from spire.api.types import types_pb2``);
they are rewritten to package-relative ones so the generated modules live
inside trio_spirecsi._proto without touching sys.path. Imports of the
protobuf runtime's own well-known types (``google.protobuf``) stay absolute;
``google.rpc`` is ours (protos/google/rpc), so it is rewritten too.
"""

from __future__ import annotations

import functools
import re
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "trio_spirecsi" / "_proto"
_IMPORT = re.compile(
    r"^from ((?:csi|spire|spiffe|envoy|google\.rpc)(?:\.\w+)*) import (\w+_pb2)", re.M
)


def _relative(match: re.Match[str], depth: int) -> str:
    return f"from {'.' * (depth + 1)}{match.group(1)} import {match.group(2)}"


def _mypy_plugin() -> str:
    """mypy-protobuf's protoc plugin, installed beside this interpreter (PATH may lack it)."""
    beside = Path(sys.executable).parent / "protoc-gen-mypy"
    found = str(beside) if beside.exists() else shutil.which("protoc-gen-mypy")
    if not found:
        sys.exit("protoc-gen-mypy not found: install the dev extras (pip install -e '.[dev]')")
    return found


def generate(out: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--plugin=protoc-gen-mypy={_mypy_plugin()}",
            f"--mypy_out={tmp}",
            *sources,
        ]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for path in sorted(Path(tmp).rglob("*")):
            rel = path.relative_to(tmp)
            target = out / rel
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            depth = len(rel.parts) - 1
            text = path.read_text()
            text = _IMPORT.sub(functools.partial(_relative, depth=depth), text)
            target.write_text(text)
        for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
            (folder / "__init__.py").touch()
        (out / "__init__.py").write_text(
            '"""Generated from protos/ by `just protos`; never edit by hand."""\n'
        )


def main() -> None:
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)


if __name__ == "__main__":
    main()
