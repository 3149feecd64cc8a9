"""`nixl`: the receiver READs the sender's registered memory with NVIDIA NIXL
(UCX underneath: RDMA or TCP between hosts, shared memory (CMA) on one host,
GPU-direct for CUDA tensors, which stay on the GPU and register as VRAM).

One NIXL agent per backend, named `disagfusion-<host>-<pid>-<token>`, with the
UCX backend and no progress thread (busy polling costs 4-20x on small
machines): both sides make progress by polling with a short sleep
(`poll_sleep_us`; asyncio rounds sleeps up to a millisecond). Over TCP UCX
emulates a remote read with messages the *sender* answers, so a task polls the
sender's agent too: every `poll_sleep_us` while anything is published, every
5 ms otherwise.

publish registers each tensor (contiguous CPU tensors in place, others copied
first; zero-element tensors are not registered) and gives it a handle,
compact JSON:

    {"v": 1, "rid": REQUEST_ID, "agent": NAME, "mem": "DRAM" | "VRAM",
     "addr": A, "len": N, "dev": D, "md": B64,
     "guard": G, "nonce": B64, "gmd": B64}

`md` is the agent's partial metadata (connection info and this one region;
a few hundred bytes), `gmd` the same for the sender's guard slab. NIXL's own
descriptor serialization is pickle, which a receiver must never load from the
wire, so the descriptor is plain numbers.

The guard: each publication owns a 16-byte slot in a slab the sender
registers once and never frees, holding a random nonce; release zeroes it
before deregistering anything. The receiver reads the nonce before the data
(a stale handle fails without touching memory the sender may have freed) and
again after it (a release during the read is caught): a fetch after release
is a TransferError, never old bytes. NIXL itself refuses descriptors outside
the regions a metadata blob names (a DescriptorError), and the receiver only
ever writes into the buffers it allocated for this fetch.

Receivers load the handle's metadata for every fetch (microseconds once the
agent is known; a new region adds to it), drop an agent whose connection
broke, and drop agents idle for a while or that accumulated many regions. A
fetch is bounded by `timeout_s`; a dead sender fails at once (connection
refused, or UCX reports the peer gone). A read still in flight when a fetch
gives up (timeout, cancellation) is not cancelled (cancelling UCX reads
crashed in testing): it is left to finish, with its buffers and the remote
agent kept until it does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import importlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.transport.base import (
    MAX_HANDLE_BYTES,
    Backend,
    DescriptorError,
    Outgoing,
    Peer,
    TransferError,
    check_meta_sizes,
    empty_like_meta,
    inline_option,
    meta_for,
)


def _import_nixl() -> tuple[Any, Any]:
    """NIXL's Python API and bindings; ImportError (TransportUnavailable for the
    registry) when no wheel is installed. Imported by name, so type checking
    does not need NIXL installed."""
    for package in ("nixl_cu12", "nixl_cu13", "nixl"):
        try:
            return importlib.import_module(package), importlib.import_module(f"{package}._bindings")
        except ImportError:
            continue
    raise ImportError("NIXL is not installed (pip install nixl-cu12)")


nixl, nixl_bindings = _import_nixl()

log = logging.getLogger(__name__)

HANDLE_VERSION = 1
MEM_TYPES = ("DRAM", "VRAM")
NONCE_BYTES = 16
GUARD_SLOTS = 1024  # nonces per slab; another slab is registered when one is full
# The most tensor bytes one payload fetches (the payload limit of runtime/payload.py).
MAX_FETCH_BYTES = 4 << 30
MAX_AGENT_NAME = 256
# A remote agent is dropped (its regions with it) when idle this long, or after
# this many loaded metadata blobs, whenever no transfer from it is in flight.
REMOTE_IDLE_S = 300.0
REMOTE_MAX_LOADS = 4096
# How often a sender with nothing published still answers reads (stale handles),
# and how often abandoned reads are checked.
IDLE_POLL_S = 0.005

# NIXL errors that say the handle, not the network, is wrong.
_DESCRIPTOR_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(nixl_bindings, name)
    for name in ("nixlNotFoundError", "nixlInvalidParamError", "nixlMismatchError")
    if hasattr(nixl_bindings, name)
)
_DISCONNECT_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(nixl_bindings, name)
    for name in ("nixlRemoteDisconnectError", "nixlBackendError")
    if hasattr(nixl_bindings, name)
)


class _Region(NamedTuple):
    """Remote memory: address, length, device id, NIXL memory type."""

    addr: int
    length: int
    dev: int
    mem: str


@dataclass
class _Remote:
    gmd: bytes = b""  # the guard slab metadata already loaded
    loads: int = 0
    in_flight: int = 0
    used: float = field(default_factory=time.monotonic)
    stale: bool = False  # drop when nothing is in flight


@dataclass
class _Job:
    """One fetch: its registered receive buffers, and the reads that were still
    in flight when it gave up (a timeout, a cancellation). UCX cannot safely
    cancel those, so they are left to finish; until then the buffers stay
    allocated and registered and the remote agent stays loaded."""

    remote: _Remote
    buffers: list[torch.Tensor]
    regs: list[Any]
    unfinished: list[Any] = field(default_factory=list)  # nixl transfer handles


@dataclass(frozen=True)
class Descriptor:
    """One tensor's handle, parsed."""

    agent: str
    mem: str
    addr: int
    length: int
    dev: int
    md: bytes
    guard: int
    nonce: bytes
    gmd: bytes

    @property
    def region(self) -> _Region:
        return _Region(self.addr, self.length, self.dev, self.mem)


@dataclass
class _Publication:
    regs: list[Any]  # nixlRegDList per registered tensor
    keep: list[torch.Tensor]  # the registered tensors (copies included)
    slot: tuple[torch.Tensor, int]  # (slab, index)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise DescriptorError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as err:
        raise DescriptorError(f"{what} is not valid base64") from err


def _int(doc: Mapping[str, Any], key: str, limit: int) -> int:
    value = doc.get(key)
    if type(value) is not int or not 0 <= value < limit:
        raise DescriptorError(f"handle field {key!r} is not an integer in 0..{limit - 1}")
    return value


def parse_handle(request_id: str, meta: pb.TensorMeta) -> Descriptor:
    """One handle checked for shape and plausibility (DescriptorError otherwise)."""
    if meta.location != pb.NIXL:
        raise DescriptorError(f"tensor {meta.name!r} is not a NIXL tensor")
    if not meta.handle or len(meta.handle) > MAX_HANDLE_BYTES:
        raise DescriptorError(f"tensor {meta.name!r}: missing or oversized NIXL handle")
    try:
        doc = json.loads(meta.handle)
    except (UnicodeDecodeError, ValueError) as err:
        raise DescriptorError(f"tensor {meta.name!r}: handle is not JSON") from err
    if not isinstance(doc, dict) or doc.get("v") != HANDLE_VERSION:
        raise DescriptorError(f"tensor {meta.name!r}: not a version {HANDLE_VERSION} handle")
    if doc.get("rid") != request_id:
        raise DescriptorError(f"tensor {meta.name!r}: handle belongs to another request")
    agent = doc.get("agent")
    if not isinstance(agent, str) or not 0 < len(agent) <= MAX_AGENT_NAME:
        raise DescriptorError(f"tensor {meta.name!r}: bad agent name")
    mem = doc.get("mem")
    if mem not in MEM_TYPES:
        raise DescriptorError(f"tensor {meta.name!r}: unknown memory type {mem!r}")
    length = _int(doc, "len", 1 << 63)
    if length != meta.nbytes:
        raise DescriptorError(f"tensor {meta.name!r}: handle length {length} != {meta.nbytes}")
    desc = Descriptor(
        agent=agent,
        mem=mem,
        addr=_int(doc, "addr", 1 << 64),
        length=length,
        dev=_int(doc, "dev", 1 << 16),
        md=_unb64(doc.get("md"), "md"),
        guard=_int(doc, "guard", 1 << 64),
        nonce=_unb64(doc.get("nonce"), "nonce"),
        gmd=_unb64(doc.get("gmd"), "gmd"),
    )
    if len(desc.nonce) != NONCE_BYTES or not any(desc.nonce):
        raise DescriptorError(f"tensor {meta.name!r}: bad guard nonce")
    if length and (not desc.md or desc.addr == 0):
        raise DescriptorError(f"tensor {meta.name!r}: handle has no region metadata")
    if not desc.gmd or desc.guard == 0:
        raise DescriptorError(f"tensor {meta.name!r}: handle has no guard")
    return desc


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _mem_type(t: torch.Tensor) -> str:
    return "VRAM" if t.is_cuda else "DRAM"


def _dev(t: torch.Tensor) -> int:
    return t.get_device() if t.is_cuda else 0


def _register(agent: Any, t: torch.Tensor) -> Any:
    """Register one contiguous, non-empty tensor (as a plain region: NIXL's own
    tensor path cannot take a 0-dim tensor)."""
    return agent.register_memory([(t.data_ptr(), _nbytes(t), _dev(t), "")], _mem_type(t))


def _sync(t: torch.Tensor) -> None:
    """Kernels queued on the tensor's stream finish before NIXL touches it."""
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()


class NixlBackend(Backend):
    name = "nixl"
    location = pb.NIXL
    pushes = False
    default_inline_below = 256 << 10
    option_help = {
        **inline_option(256 << 10),
        "ucx_tls": "UCX_TLS for this agent's UCX context, e.g. tcp (default: UCX's choice)",
        "poll_sleep_us": "sleep between transfer-state polls, microseconds (default 100)",
        "timeout_s": "seconds a fetch may take before it fails (default 30)",
    }

    def __init__(self, options: Mapping[str, str] | None = None, device: str = "cpu") -> None:
        super().__init__(options, device)
        try:
            self.poll_s = float(self.options.get("poll_sleep_us", "100")) / 1e6
            self.timeout_s = float(self.options.get("timeout_s", "30"))
        except ValueError as err:
            raise ValueError(f"transport option of nixl is not a number: {err}") from None
        if not 0 <= self.poll_s <= 0.1:
            raise ValueError("transport option poll_sleep_us must be in 0..100000")
        if not 0 < self.timeout_s <= 3600:
            raise ValueError("transport option timeout_s must be in (0, 3600]")
        self.agent_name = f"disagfusion-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        tls = self.options.get("ucx_tls")
        previous = os.environ.get("UCX_TLS")
        if tls:
            os.environ["UCX_TLS"] = tls  # read when the agent creates its UCX context
        try:
            agent = nixl.nixl_agent(
                self.agent_name,
                nixl.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]),
            )
        finally:
            if tls:
                if previous is None:
                    os.environ.pop("UCX_TLS", None)
                else:
                    os.environ["UCX_TLS"] = previous
        if "UCX" not in agent.backends:
            raise RuntimeError("NIXL has no UCX backend here")
        self._agent: Any = agent
        self._publications: dict[int, _Publication] = {}
        self._next_pub = 0
        self._slabs: list[tuple[torch.Tensor, Any, bytes]] = []  # (slab, reg, metadata)
        self._free_slots: list[tuple[torch.Tensor, int]] = []
        self._slab_md: dict[int, bytes] = {}  # slab data_ptr -> its partial metadata
        self._remotes: dict[str, _Remote] = {}
        # Fetches whose reads were abandoned in flight, until those finish.
        self._abandoned: list[_Job] = []
        self._reaper: asyncio.Task[None] | None = None
        self._progress: asyncio.Task[None] | None = None
        self._closed = False

    # ---- both sides -------------------------------------------------------

    def endpoint(self) -> str:
        return self.agent_name

    def reaches(self, peer: Peer) -> bool:
        return self.name in peer.accepts

    def _live(self) -> Any:
        if self._closed:
            raise TransferError("the nixl transport is closed")
        return self._agent

    # ---- sender -----------------------------------------------------------

    def _slot(self) -> tuple[torch.Tensor, int]:
        if not self._free_slots:
            agent = self._live()
            slab = torch.zeros(GUARD_SLOTS, NONCE_BYTES, dtype=torch.uint8)
            reg = _register(agent, slab)
            md = agent.get_partial_agent_metadata(reg, True, ["UCX"])
            self._slabs.append((slab, reg, md))
            self._slab_md[slab.data_ptr()] = md
            self._free_slots.extend((slab, i) for i in reversed(range(GUARD_SLOTS)))
        return self._free_slots.pop()

    async def publish(
        self, request_id: str, tensors: Mapping[str, torch.Tensor], peer: Peer
    ) -> Outgoing:
        agent = self._live()
        slab, index = self._slot()
        nonce = secrets.token_bytes(NONCE_BYTES)
        while not any(nonce):  # zero means released
            nonce = secrets.token_bytes(NONCE_BYTES)
        slab[index].copy_(torch.frombuffer(bytearray(nonce), dtype=torch.uint8))
        guard = slab[index].data_ptr()
        gmd = _b64(self._slab_md[slab.data_ptr()])
        pub = _Publication(regs=[], keep=[], slot=(slab, index))
        pub_id = self._next_pub
        self._next_pub += 1
        self._publications[pub_id] = pub
        metas: list[pb.TensorMeta] = []
        try:
            for name, tensor in tensors.items():
                t = tensor.detach()
                if not t.is_contiguous():
                    t = t.contiguous()
                doc: dict[str, Any] = {"v": HANDLE_VERSION, "rid": request_id}
                doc["agent"] = self.agent_name
                doc["mem"] = _mem_type(t)
                doc["addr"], doc["len"], doc["dev"], doc["md"] = 0, _nbytes(t), _dev(t), ""
                if t.numel():
                    _sync(t)
                    # NIXL counts registrations: views of one tensor, or a tensor in
                    # two publications, register (and deregister) independently.
                    reg = _register(agent, t)
                    pub.regs.append(reg)
                    pub.keep.append(t)
                    doc["addr"] = t.data_ptr()
                    doc["md"] = _b64(agent.get_partial_agent_metadata(reg, True, ["UCX"]))
                doc["guard"], doc["nonce"], doc["gmd"] = guard, _b64(nonce), gmd
                handle = json.dumps(doc, separators=(",", ":")).encode()
                metas.append(meta_for(name, tensor, pb.NIXL, handle))
        except Exception as err:
            self._unpublish(pub_id)
            if isinstance(err, TransferError):
                raise
            raise TransferError(f"nixl could not register the payload: {err}") from err
        self._ensure_progress()

        async def release() -> None:
            self._unpublish(pub_id)

        return Outgoing(metas, release=release)

    def _unpublish(self, pub_id: int) -> None:
        pub = self._publications.pop(pub_id, None)
        if pub is None:
            return
        slab, index = pub.slot
        slab[index].zero_()  # first: from now on every read of this handle fails
        for reg in pub.regs:
            try:
                self._agent.deregister_memory(reg)
            except Exception as err:  # pragma: no cover - NIXL refused
                log.warning("nixl could not deregister a region: %s", err)
        pub.regs.clear()
        pub.keep.clear()
        self._free_slots.append((slab, index))

    def _ensure_progress(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._progress
        if task is None or task.done() or task.get_loop() is not loop:
            self._progress = loop.create_task(self._serve())

    async def _serve(self) -> None:
        """Answer remote reads: UCX over TCP emulates them with messages the
        target must progress (shared memory and RDMA do not need it). Fast while
        anything is published, slowly after, so that a stale handle's guard
        read is answered (and fails) at once rather than at the timeout."""
        while not self._closed:
            try:
                self._agent.get_new_notifs()
            except Exception as err:  # pragma: no cover - progress itself failed
                log.warning("nixl progress failed: %s", err)
            await asyncio.sleep(self.poll_s if self._publications else IDLE_POLL_S)

    # ---- receiver ---------------------------------------------------------

    def _parse(self, request_id: str, metas: Sequence[pb.TensorMeta]) -> list[Descriptor]:
        check_meta_sizes(metas)
        descs = [parse_handle(request_id, meta) for meta in metas]
        total = sum(d.length for d in descs)
        if total > MAX_FETCH_BYTES:
            raise DescriptorError(f"payload of {total} bytes exceeds {MAX_FETCH_BYTES}")
        if descs:
            first = descs[0]
            for d in descs[1:]:
                if (d.agent, d.guard, d.nonce, d.gmd) != (
                    first.agent,
                    first.guard,
                    first.nonce,
                    first.gmd,
                ):
                    raise DescriptorError("the tensors' handles name different publications")
        return descs

    def check(self, request_id: str, metas: Sequence[pb.TensorMeta]) -> None:
        self._parse(request_id, metas)

    async def fetch(
        self,
        request_id: str,
        metas: Sequence[pb.TensorMeta],
        inline: AsyncIterator[bytes],
    ) -> dict[str, torch.Tensor]:
        descs = self._parse(request_id, metas)
        out = {meta.name: empty_like_meta(meta, self.device) for meta in metas}
        wanted = [(out[meta.name], d) for meta, d in zip(metas, descs, strict=True) if d.length]
        if not wanted:
            return out
        agent = self._live()
        name = descs[0].agent
        deadline = time.monotonic() + self.timeout_s
        remote = self._load(name, descs)
        remote.in_flight += 1
        guard = _Region(descs[0].guard, NONCE_BYTES, 0, "DRAM")
        scratch = torch.zeros(NONCE_BYTES, dtype=torch.uint8)
        buffers = [scratch] + [t for t, _ in wanted]
        job = _Job(remote, buffers, [])
        try:
            for t in buffers:
                _sync(t)
                job.regs.append(_register(agent, t))
            await self._check_guard(job, name, guard, descs[0].nonce, scratch, deadline)
            # One transfer per pair of memory types (a payload may mix CPU and GPU).
            groups: dict[tuple[str, str], list[tuple[torch.Tensor, _Region]]] = {}
            for t, d in wanted:
                groups.setdefault((_mem_type(t), d.mem), []).append((t, d.region))
            await self._read_all(job, name, list(groups.values()), deadline)
            await self._check_guard(job, name, guard, descs[0].nonce, scratch, deadline)
        except Exception as err:
            if isinstance(err, TransferError | DescriptorError):
                raise
            raise TransferError(f"nixl read from {name!r} failed: {err}") from err
        finally:
            if job.unfinished:
                self._abandon(job)
            else:
                self._finish(job)
        return out

    def _finish(self, job: _Job) -> None:
        self._deregister(job.regs)
        job.regs.clear()
        job.buffers.clear()
        job.remote.in_flight -= 1
        job.remote.used = time.monotonic()
        self._prune()

    def _abandon(self, job: _Job) -> None:
        self._abandoned.append(job)
        loop = asyncio.get_running_loop()
        task = self._reaper
        if task is None or task.done() or task.get_loop() is not loop:
            self._reaper = loop.create_task(self._reap())

    async def _reap(self) -> None:
        """Release abandoned reads as they finish (or fail), then their buffers."""
        while self._abandoned and not self._closed:
            await asyncio.sleep(IDLE_POLL_S)
            for job in list(self._abandoned):
                still = []
                for handle in job.unfinished:
                    try:
                        state = self._agent.check_xfer_state(handle)
                    except Exception:
                        state = "ERR"
                    if state == "PROC":
                        still.append(handle)
                        continue
                    try:
                        handle.release()
                    except Exception as err:  # pragma: no cover - NIXL refused
                        log.warning("nixl could not release a finished transfer: %s", err)
                job.unfinished = still
                if not still:
                    self._abandoned.remove(job)
                    self._finish(job)

    def _deregister(self, regs: list[Any]) -> None:
        for reg in regs:
            try:
                self._agent.deregister_memory(reg)
            except Exception as err:  # pragma: no cover - NIXL refused
                log.warning("nixl could not deregister a receive buffer: %s", err)

    def _load(self, name: str, descs: Sequence[Descriptor]) -> _Remote:
        """Make the sender's regions (and its guard slab) known to our agent."""
        remote = self._remotes.get(name)
        if remote is None:
            remote = self._remotes[name] = _Remote()
        remote.used = time.monotonic()
        if name == self.agent_name:
            return remote  # loopback: our own registrations
        blobs = [d.md for d in descs if d.length]
        if remote.gmd != descs[0].gmd:
            blobs.insert(0, descs[0].gmd)
        for blob in blobs:
            try:
                loaded = self._agent.add_remote_agent(blob)
            except _DISCONNECT_ERRORS as err:
                self._mark_stale(name)
                self._prune()
                raise TransferError(f"cannot reach nixl agent {name!r}: {err}") from err
            except Exception as err:
                raise DescriptorError(f"bad nixl metadata for agent {name!r}: {err}") from err
            if isinstance(loaded, bytes):
                loaded = loaded.decode(errors="replace")
            if loaded != name:
                if loaded not in self._remotes:
                    self._drop(str(loaded))  # forget the connection it made
                raise DescriptorError(f"metadata names agent {loaded!r}, not {name!r}")
            remote.loads += 1
        remote.gmd = descs[0].gmd
        return remote

    async def _check_guard(
        self,
        job: _Job,
        name: str,
        guard: _Region,
        nonce: bytes,
        scratch: torch.Tensor,
        deadline: float,
    ) -> None:
        scratch.zero_()
        await self._read_all(job, name, [[(scratch, guard)]], deadline)
        if scratch.numpy().tobytes() != nonce:
            raise TransferError("the sender released this payload (its guard changed)")

    async def _read_all(
        self,
        job: _Job,
        name: str,
        groups: Sequence[Sequence[tuple[torch.Tensor, _Region]]],
        deadline: float,
    ) -> None:
        """READ each group (local buffers, remote regions of one memory type)."""
        agent = self._agent
        handles: list[Any] = []
        finished: set[int] = set()  # id() of handles that are no longer in flight
        try:
            for group in groups:
                local = agent.get_xfer_descs(
                    [(t.data_ptr(), _nbytes(t), _dev(t)) for t, _ in group], _mem_type(group[0][0])
                )
                remote = agent.get_xfer_descs(
                    [(r.addr, r.length, r.dev) for _, r in group], group[0][1].mem
                )
                if local is None or remote is None:
                    raise TransferError("nixl could not describe the transfer")
                try:
                    handle = agent.initialize_xfer("READ", local, remote, name)
                except _DESCRIPTOR_ERRORS as err:
                    raise DescriptorError(
                        f"nixl refused the descriptors of agent {name!r}: {err}"
                    ) from err
                except Exception as err:
                    self._mark_stale(name)
                    raise TransferError(f"nixl read from {name!r} failed: {err}") from err
                handles.append(handle)
                self._advance(name, agent.transfer, handle, finished)
            while len(finished) < len(handles):
                for handle in handles:
                    if id(handle) not in finished:
                        self._advance(name, agent.check_xfer_state, handle, finished)
                if len(finished) == len(handles):
                    break
                if time.monotonic() > deadline:
                    raise TransferError(
                        f"nixl read from {name!r} took more than {self.timeout_s:g} s"
                    )
                await asyncio.sleep(self.poll_s)
        finally:
            for handle in handles:
                if id(handle) not in finished:
                    job.unfinished.append(handle)  # cancelling it is not safe: let it finish
                    continue
                try:
                    handle.release()
                except Exception as err:  # pragma: no cover - NIXL refused
                    log.warning("nixl could not release a transfer: %s", err)

    def _advance(self, name: str, fn: Any, handle: Any, finished: set[int]) -> None:
        """Post or poll one transfer; mark it finished unless still in progress."""
        try:
            state = self._call(name, fn, handle)
        except TransferError:
            finished.add(id(handle))
            raise
        if state != "PROC":
            finished.add(id(handle))
        if state == "ERR":
            self._mark_stale(name)
            raise TransferError(f"nixl read from {name!r} failed")

    def _call(self, name: str, fn: Any, handle: Any) -> str:
        try:
            return str(fn(handle))
        except _DISCONNECT_ERRORS as err:
            self._mark_stale(name)
            raise TransferError(f"nixl agent {name!r} went away: {err}") from err
        except Exception as err:
            self._mark_stale(name)
            raise TransferError(f"nixl read from {name!r} failed: {err}") from err

    def _mark_stale(self, name: str) -> None:
        remote = self._remotes.get(name)
        if remote is not None:
            remote.stale = True

    def _drop(self, name: str) -> None:
        self._remotes.pop(name, None)
        if name == self.agent_name:
            return
        with contextlib.suppress(Exception):  # not loaded (or already gone)
            self._agent.remove_remote_agent(name)

    def _prune(self) -> None:
        now = time.monotonic()
        for name, remote in list(self._remotes.items()):
            if remote.in_flight:
                continue
            if remote.stale or remote.loads > REMOTE_MAX_LOADS or now - remote.used > REMOTE_IDLE_S:
                self._drop(name)

    def forget(self, address: str) -> None:
        # Senders are known by agent name, not gRPC address: idle ones are pruned.
        self._prune()

    async def close(self) -> None:
        if self._closed:
            return
        for pub_id in list(self._publications):
            self._unpublish(pub_id)
        self._closed = True
        if self._progress is not None and not self._progress.done():
            self._progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._progress
        for name in list(self._remotes):
            if not self._remotes[name].in_flight:
                self._drop(name)
        for _, reg, _ in self._slabs:
            with contextlib.suppress(Exception):
                self._agent.deregister_memory(reg)
        if self._reaper is not None and not self._reaper.done():
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        self._free_slots.clear()
        self._agent = None  # destroying the agent ends any abandoned read
        self._slabs.clear()
        self._abandoned.clear()
