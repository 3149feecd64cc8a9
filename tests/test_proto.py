"""The committed gRPC code matches disagfusion.proto (run `make proto` after editing it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = ("disagfusion_pb2.py", "disagfusion_pb2.pyi", "disagfusion_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    # protoc in a process of its own: native libraries other tests load (NIXL's
    # UCX) can crash it in the test process.
    code = "import sys; from pathlib import Path; from disagfusion.proto.generate import generate;"
    code += " sys.exit(generate(Path(sys.argv[1]), Path(sys.argv[2])))"
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(REPO)], timeout=120)
    assert run.returncode == 0
    for name in GENERATED:
        fresh = (tmp_path / "disagfusion" / "proto" / name).read_text()
        committed = (REPO / "proto" / name).read_text()
        assert fresh == committed, f"proto/{name} is stale: run `make proto`"


def test_stage_service_has_the_contract_methods() -> None:
    from disagfusion.proto import disagfusion_pb2 as pb

    stage = pb.DESCRIPTOR.services_by_name["Stage"]
    submit = stage.methods_by_name["Submit"]
    assert submit.client_streaming and submit.server_streaming
    assert "Health" in stage.methods_by_name
    assert "Generate" in pb.DESCRIPTOR.services_by_name["Gateway"].methods_by_name
    header = pb.WorkHeader.DESCRIPTOR.fields_by_name
    for field in ("request_id", "params", "tensors", "deadline_unix", "reply_to"):
        assert field in header
