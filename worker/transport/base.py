"""The transport seam: how one payload's tensor bytes get from a sender to a receiver.

Control never leaves gRPC: the Submit stream carries the header (one
`TensorMeta` per tensor: shape, dtype, location and an opaque handle), the acks
and custody. A backend only moves bytes:

- the sender *publishes* a payload's tensors for one receiver, getting an
  `Outgoing` (the metas for the header, inline chunks for `grpc`, and what to
  free afterwards);
- the receiver *checks* the descriptors (cheaply, before allocating anything)
  and *fetches* the bytes into its own buffers;
- the sender *releases* what it published when the attempt ends. The custody
  copy is the sender's `Payload` itself, which it keeps until DONE, so a
  receiver that dies before or after fetching costs a re-send (a fresh
  publish), never a lost request.

Backends that push (torch send/recv) start sending when the receiver answers
FETCHING; the others are read by the receiver on its own.
"""

from __future__ import annotations

import math
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from disagfusion.proto import disagfusion_pb2 as pb

# A handle is a few hundred bytes (NIXL metadata a few KiB): anything larger is forged.
MAX_HANDLE_BYTES = 64 << 10

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "bool",
    )
}


class DescriptorError(ValueError):
    """A descriptor the receiver refuses (malformed, forged, not this request's):
    the payload is REJECTED as invalid, not retried."""


class NotAccepted(DescriptorError):
    """Tensors in a location this receiver does not take: the sender's view of
    it is stale (it restarted with another transport); retried, after the
    sender asks it again, rather than failing the request."""


class TransferError(Exception):
    """The bytes did not arrive (the peer died, a timeout, a segment gone):
    the sender tries again, here or on another instance."""


@dataclass(frozen=True)
class Peer:
    """A receiver as the sender sees it: its gRPC address and, per backend,
    what it advertised in Health (`transport_endpoints`)."""

    address: str
    accepts: frozenset[str] = frozenset({"grpc"})
    endpoints: Mapping[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        host, _, _ = self.address.rpartition(":")
        return host.strip("[]") or "127.0.0.1"

    def endpoint(self, backend: str) -> str:
        return self.endpoints.get(backend, "")


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def meta_for(name: str, t: torch.Tensor, location: int, handle: bytes = b"") -> pb.TensorMeta:
    return pb.TensorMeta(
        name=name,
        shape=list(t.shape),
        dtype=dtype_name(t),
        nbytes=tensor_nbytes(t),
        location=location,  # type: ignore[arg-type]
        handle=handle,
    )


class ReceiveBuffers:
    """Reused host buffers for received tensors.

    A fresh 64 MiB allocation costs 25-35 ms of page faults on the build
    machine, as much as moving the bytes; a buffer handed out here goes back
    to the pool when the last tensor using it is freed (a finalizer on the
    numpy view the tensor holds), already mapped. Small buffers are not worth it.
    """

    def __init__(self, max_free_bytes: int = 512 << 20, min_bytes: int = 1 << 20) -> None:
        self.max_free_bytes = max_free_bytes
        self.min_bytes = min_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 CPU tensor of `nbytes`, contents undefined."""
        if nbytes < self.min_bytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        size = -(-nbytes // self.min_bytes) * self.min_bytes
        with self._lock:
            spare = self._free.get(size)
            base = spare.pop() if spare else None
            if base is not None:
                self._free_bytes -= size
        if base is None:
            base = np.empty(size, dtype=np.uint8)
        view = base[:nbytes]
        weakref.finalize(view, self._give_back, base)
        return torch.from_numpy(view)

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            if self._free_bytes + base.nbytes <= self.max_free_bytes:
                self._free.setdefault(base.nbytes, []).append(base)
                self._free_bytes += base.nbytes

    @property
    def free_bytes(self) -> int:
        return self._free_bytes


RECEIVE_BUFFERS = ReceiveBuffers()


def empty_like_meta(meta: pb.TensorMeta, device: str | torch.device = "cpu") -> torch.Tensor:
    """A receive buffer for one described tensor (already validated); on the
    host, from RECEIVE_BUFFERS."""
    dtype = DTYPES[meta.dtype]
    if torch.device(device).type != "cpu" or meta.nbytes < RECEIVE_BUFFERS.min_bytes:
        return torch.empty(tuple(meta.shape), dtype=dtype, device=device)
    raw = RECEIVE_BUFFERS.take(meta.nbytes)
    return raw.view(dtype).reshape(tuple(meta.shape))


def flat_bytes(t: torch.Tensor, host: bool = True) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor: a view of a contiguous tensor
    (so a receive buffer can be filled through it), else a copy; with `host`, a
    CUDA tensor is copied to host memory."""
    flat = t.detach()
    if host and flat.device.type != "cpu":
        flat = flat.to("cpu")
    return flat.contiguous().reshape(-1).view(torch.uint8)


def host_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in host memory, copied only when it is not already
    a contiguous CPU tensor."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(flat_bytes(t).numpy().data).cast("B")


def check_meta_sizes(metas: Sequence[pb.TensorMeta]) -> None:
    """Shape, dtype and nbytes agree (validate_header did this for the header;
    backends call it again on what they are handed directly)."""
    for meta in metas:
        if meta.dtype not in DTYPES:
            raise DescriptorError(f"tensor {meta.name!r} has unsupported dtype {meta.dtype!r}")
        expected = math.prod(meta.shape) * DTYPES[meta.dtype].itemsize
        if meta.nbytes != expected:
            raise DescriptorError(f"tensor {meta.name!r}: nbytes {meta.nbytes} != {expected}")


def inline_option(default: int) -> dict[str, str]:
    """The `inline_below` option, for backends that read it."""
    return {"inline_below": f"payloads of fewer bytes go inline on the stream (default {default})"}


class Outgoing:
    """One payload published for one receiver, for one attempt."""

    def __init__(
        self,
        metas: list[pb.TensorMeta],
        inline: Iterable[memoryview | bytes] = (),
        start: Callable[[], Awaitable[None]] | None = None,
        release: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.metas = metas
        self.inline = inline
        self._start = start
        self._release = release
        self._released = False

    async def start(self) -> None:
        """The receiver answered FETCHING: a pushing backend sends now. Raises
        TransferError when the bytes cannot be sent."""
        if self._start is not None:
            await self._start()

    async def release(self) -> None:
        """Free what publish took (segments, registrations). Idempotent."""
        if self._released:
            return
        self._released = True
        if self._release is not None:
            await self._release()


class Backend(ABC):
    """One way of moving tensor bytes. One instance per process serves both
    directions: publishing what this process sends and fetching what it receives."""

    name: ClassVar[str]
    location: ClassVar[int]  # a pb.TensorLocation value
    pushes: ClassVar[bool] = False  # the sender sends when the receiver answers FETCHING
    # The `--transport-option KEY=VALUE` keys this backend reads, with their meaning.
    option_help: ClassVar[Mapping[str, str]] = {}
    # Payloads smaller than this go inline (grpc) even where this backend could
    # take them: below it, the backend's fixed cost per hand-off exceeds what it
    # saves on the bytes. Option `inline_below` where the backend lists it.
    default_inline_below: ClassVar[int] = 0

    def __init__(self, options: Mapping[str, str] | None = None, device: str = "cpu") -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.option_help))
        if unknown:
            known = ", ".join(sorted(self.option_help)) or "none"
            raise ValueError(
                f"transport {self.name!r} has no option {', '.join(unknown)} (it knows: {known})"
            )
        self.options = options
        self.device = device
        try:
            self.inline_below = int(options.get("inline_below", self.default_inline_below))
        except ValueError:
            raise ValueError("transport option inline_below must be a byte count") from None
        if self.inline_below < 0:
            raise ValueError("transport option inline_below must be a byte count")

    def endpoint(self) -> str:
        """What a sender needs to reach this process with this backend
        (advertised in Health); "" when the gRPC address is enough."""
        return ""

    def reaches(self, peer: Peer) -> bool:
        """Whether this process can send to `peer` with this backend (the peer
        accepts it, and e.g. shares this host for shared memory)."""
        return self.name in peer.accepts

    @abstractmethod
    async def publish(
        self, request_id: str, tensors: Mapping[str, torch.Tensor], peer: Peer
    ) -> Outgoing:
        """Make `tensors` fetchable by `peer`; the metas go in the header."""

    @abstractmethod
    def check(self, request_id: str, metas: Sequence[pb.TensorMeta]) -> None:
        """Raise DescriptorError unless every handle is well formed and plausibly
        this request's. Touches no memory and allocates nothing."""

    @abstractmethod
    async def fetch(
        self,
        request_id: str,
        metas: Sequence[pb.TensorMeta],
        inline: AsyncIterator[bytes],
    ) -> dict[str, torch.Tensor]:
        """The tensors, in this process's buffers. `inline` yields the stream's
        data chunks (only `grpc` reads it). Raises DescriptorError for a handle
        that turns out not to be the sender's, TransferError when the bytes do
        not arrive."""

    def forget(self, address: str) -> None:  # noqa: B027 - optional hook
        """`address` went away (unhealthy, removed): drop per-peer state."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Free everything at shutdown."""
