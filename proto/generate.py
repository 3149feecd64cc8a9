"""Regenerate the Python gRPC code from disagfusion.proto (`make proto`).

Run from the repository root; the output is committed, and a test checks it
is fresh.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = "disagfusion/proto/disagfusion.proto"


def generate(out_dir: Path, root: Path) -> int:
    from grpc_tools import protoc  # dev dependency

    include = Path(protoc.__file__).parent / "_proto"
    return protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(root / PROTO),
        ]
    )


if __name__ == "__main__":
    repo = Path(__file__).resolve().parent.parent
    sys.exit(generate(repo, repo))
