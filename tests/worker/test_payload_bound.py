"""A stage takes no payload larger than its model can need (issue #14, limits).

The bound is derived from the loaded model (its largest size and clip, the
gateway's largest n, guidance on) and is checked against what the real
upstream stage of every built-in family sends for the largest request; a
`disagfusion worker` started as a pod starts it refuses a header declaring
more before reading or allocating anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.models import BUILTIN_NAMES, load_stage
from disagfusion.worker.models.families.base import MAX_REFERENCE_SIDE
from disagfusion.worker.params import DEFAULT_MAX_IMAGES
from disagfusion.worker.runtime.payload import DEFAULT_MAX_PAYLOAD_BYTES
from tests.worker.commands import running
from tests.worker.runtime_harness import free_port
from tests.worker.serve_local import is_ready

pytestmark = pytest.mark.timeout(300)

# Longer than every text encoder's max length: the encoders truncate it.
LONG_PROMPT = " ".join(["a very detailed lighthouse on a cliff at dusk"] * 100)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("builtin", BUILTIN_NAMES)
def test_the_largest_request_fits_and_the_bound_is_the_models(builtin: str) -> None:
    model = f"builtin:{builtin}"
    encoder, denoiser, decoder = (load_stage(r, model) for r in ("encoder", "denoiser", "decoder"))
    n = DEFAULT_MAX_IMAGES
    params = replace(denoiser.largest_request(n, LONG_PROMPT), num_inference_steps=1)
    inputs: dict[str, torch.Tensor] = {}
    if denoiser.info.reference == "required":
        side = MAX_REFERENCE_SIDE
        inputs["reference_image"] = torch.zeros((side, side, 3), dtype=torch.uint8)
    assert _nbytes(inputs) <= encoder.max_input_bytes(n)
    # what the real encoder sends the denoiser for the largest request
    embeddings = encoder.run(params, inputs)
    assert set(embeddings) == set(denoiser.input_names(params))
    assert _nbytes(embeddings) <= denoiser.max_input_bytes(n)
    # the latents the denoiser sends the decoder at the model's largest size (float32)
    latents = torch.Size([d or 0 for d in decoder.latent_shape(params)]).numel() * 4
    assert 0 < latents <= decoder.max_input_bytes(n)
    # the model's own bound: well under the runtime's fallback, and it grows with n
    for stage in (denoiser, decoder):
        assert stage.max_input_bytes(n) < DEFAULT_MAX_PAYLOAD_BYTES // 16
        assert stage.max_input_bytes(2 * n) > stage.max_input_bytes(n)
    if not inputs:  # text-only: the encoder takes no tensor bytes at all
        assert encoder.max_input_bytes(n) == 0


# ---- as a pod runs it ---------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`disagfusion worker --stage decoder` of tiny-unet, for requests of up to 2 images."""
    port, http_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    args = ["worker", "--stage", "decoder", "--model", "builtin:tiny-unet", "--max-images", "2"]
    args += ["--port", str(port), "--http-port", str(http_port)]
    with running(args, log, lambda: is_ready(f"http://127.0.0.1:{http_port}")):
        yield f"127.0.0.1:{port}", log


def _submit_header(address: str, meta: pb.TensorMeta) -> pb.Ack:
    header = pb.WorkHeader(
        request_id=f"bound-{meta.nbytes}",
        params=pb.GenerationParams(prompt="x", width=64, height=64, num_images=1),
        tensors=[meta],
        source_stage="denoiser",
        pipeline="local",
    )
    with grpc.insecure_channel(address) as channel:
        acks = list(
            pb_grpc.StageStub(channel).Submit(iter([pb.WorkChunk(header=header)]), timeout=30)
        )
    assert len(acks) == 1, acks
    return acks[0]


def test_a_worker_refuses_a_payload_its_model_cannot_need(
    decoder_worker: tuple[str, Path],
) -> None:
    address, log = decoder_worker
    bound = load_stage("decoder", "builtin:tiny-unet").max_input_bytes(2)
    assert f"decoder takes payloads of at most {bound / 1024:.1f} KiB" in log.read_text()
    # 256 MiB of "latents": under the runtime's 1 GiB fallback, far over the model's bound
    side = 8192
    meta = pb.TensorMeta(
        name="latents",
        shape=[1, 1, side, side],
        dtype="float32",
        nbytes=side * side * 4,
        location=pb.INLINE,
    )
    ack = _submit_header(address, meta)
    assert ack.status == pb.Ack.REJECTED and not ack.retryable
    assert f"declares at least {side * side * 4} bytes" in ack.reason
    assert f"takes at most {bound}" in ack.reason
    # one byte over the bound: refused alike
    over = pb.TensorMeta(
        name="latents", shape=[bound + 1], dtype="uint8", nbytes=bound + 1, location=pb.INLINE
    )
    assert f"takes at most {bound}" in _submit_header(address, over).reason
