"""`torch`: torch.distributed point-to-point send/recv, one world-size-2 process
group per (sender process, receiver process) pair, built without
`init_process_group` so one process can hold many and drop them as peers come
and go.

- The receiver hosts a `TCPStore` (created with the backend) and advertises its
  port in Health: `port=12345`, plus `;cuda=<GPU uuid>` when it receives on a
  CUDA device with NCCL.
- The sender creates a group the first time it publishes to a peer, in a thread
  (publish does not wait: the receiver joins only once it has seen the header);
  the receiver joins when a header names a group it does not know. Group ids
  are `<sender token>.<generation>` (`.nccl` appended for NCCL groups); the
  sender is rank 0, the receiver rank 1.
- Each tensor has a handle, compact JSON `{"group", "tag", "backend",
  "sender_host", "sender_port"}`: its process group, the send/recv tag (a
  per-group counter), `gloo` or `nccl`, the sender's IP (the receiver binds its
  gloo device to the local address that routes there) and the sender's own
  store port (0: none), which the receiver probes while a receive is pending.
- The sender pushes when the receiver answers FETCHING (`Outgoing.start`); the
  receiver receives into its own buffers. gloo moves host bytes (a CUDA tensor
  is copied to the host first); NCCL, used when the tensors are on a CUDA device
  and the receiver advertises another GPU, moves them device to device. NCCL
  has no tags, so each NCCL payload is announced on the pair's gloo group with a
  sequence number and the receiver takes payloads in that order.
- Faults: gloo reports a killed peer within milliseconds ("Connection closed by
  peer") for an operation that is waiting, but not for one whose bytes are
  being written or read at that moment: that one waits out its whole timeout.
  So while a transfer is pending each side probes the other's TCPStore every
  PROBE_S; a dead peer surfaces as TransferError within about that, and the
  stuck gloo wait is left to end on its own timeout in its daemon thread. Any
  error drops the group on the side that saw it (closing its sockets, so the
  other side fails fast too); the next publish makes a new generation. Every
  wait is bounded by `timeout_s` / `connect_timeout_s`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import os
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

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
    flat_bytes,
    inline_option,
    meta_for,
)

T = TypeVar("T")

GROUP_ID = re.compile(r"[0-9a-f]{16}\.[0-9]{1,12}(\.nccl)?")
MAX_TAG = 2**31 - 1
MAX_GROUPS = 256  # receiver side: groups kept (least recently used dropped)
MAX_DEAD = 4096  # receiver side: dropped group ids remembered (refused at once)
HANDLE_KEYS = frozenset({"group", "tag", "backend", "sender_host", "sender_port"})
NCCL_POLL_S = 0.0005
# gloo misses a receiver that dies while a send is being written (the send waits
# out its whole timeout), so a pending send also watches the receiver's store.
PROBE_S = 0.25
THREAD_PREFIX = "torch-transport"


def _nccl_available() -> bool:
    return (
        dist.is_available()
        and hasattr(dist, "ProcessGroupNCCL")
        and dist.is_nccl_available()
        and torch.cuda.is_available()
    )


def _gpu_uuid(device: torch.device) -> str:
    try:
        props = torch.cuda.get_device_properties(device)
    except Exception:
        return ""
    return str(getattr(props, "uuid", "") or "")


def _float_option(options: Mapping[str, str], key: str, default: float) -> float:
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"transport option {key} must be a number, not {raw!r}") from None
    if not value > 0:
        raise ValueError(f"transport option {key} must be positive")
    return value


def _running_future() -> concurrent.futures.Future[Any]:
    # Marked running so that a cancelled waiter (asyncio.wrap_future) cannot cancel it.
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    fut.set_running_or_notify_cancel()
    return fut


def _in_thread(fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
    """`fn(*args)` in a daemon thread of its own: a gloo wait cannot be
    interrupted, and one left running must not hold up the process's exit."""
    fut = _running_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as err:
            fut.set_exception(err)
        else:
            fut.set_result(result)

    threading.Thread(target=run, name=f"{THREAD_PREFIX}-{fn.__name__}", daemon=True).start()
    return fut


async def _await(fut: concurrent.futures.Future[T], timeout_s: float | None = None) -> T:
    return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)


def _route_ip(host: str) -> str:
    """The local address that routes to `host` (no packet is sent); "" when unknown."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.connect(addr)
            return str(s.getsockname()[0])
    except (OSError, IndexError):
        return ""


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def parse_endpoint(endpoint: str) -> tuple[int, str | None]:
    """(store port, GPU uuid) from an advertised endpoint: port 0 when there is
    none, uuid None when the receiver has no CUDA ("" when it did not say which GPU)."""
    port, cuda = 0, None
    for part in endpoint.split(";"):
        key, sep, value = part.strip().partition("=")
        if key == "port" and value.isdigit() and 0 < int(value) < 65536:
            port = int(value)
        elif key == "cuda":
            cuda = value if sep else ""
    return port, cuda


@dataclass(frozen=True)
class _Handle:
    group: str
    tag: int
    backend: str
    sender_host: str
    sender_port: int


def encode_handle(
    group: str, tag: int, backend: str, sender_host: str, sender_port: int = 0
) -> bytes:
    doc = {
        "group": group,
        "tag": tag,
        "backend": backend,
        "sender_host": sender_host,
        "sender_port": sender_port,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _decode_handle(meta: pb.TensorMeta) -> _Handle:
    if len(meta.handle) > MAX_HANDLE_BYTES:
        raise DescriptorError(f"tensor {meta.name!r}: handle too large")
    try:
        doc = json.loads(meta.handle)
    except (ValueError, UnicodeDecodeError):
        raise DescriptorError(f"tensor {meta.name!r}: handle is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != HANDLE_KEYS:
        raise DescriptorError(f"tensor {meta.name!r}: handle needs exactly {sorted(HANDLE_KEYS)}")
    group, tag, backend = doc["group"], doc["tag"], doc["backend"]
    host, port = doc["sender_host"], doc["sender_port"]
    if not isinstance(group, str) or not GROUP_ID.fullmatch(group):
        raise DescriptorError(f"tensor {meta.name!r}: malformed group id")
    if type(tag) is not int or not 1 <= tag <= MAX_TAG:
        raise DescriptorError(f"tensor {meta.name!r}: tag must be an int in 1..{MAX_TAG}")
    if backend not in ("gloo", "nccl"):
        raise DescriptorError(f"tensor {meta.name!r}: unknown process group backend")
    if (backend == "nccl") != group.endswith(".nccl"):
        raise DescriptorError(f"tensor {meta.name!r}: group id does not match backend {backend}")
    if not isinstance(host, str):
        raise DescriptorError(f"tensor {meta.name!r}: malformed sender_host")
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise DescriptorError(f"tensor {meta.name!r}: sender_host is not an IP") from None
    if type(port) is not int or not 0 <= port < 65536 or (port and not host):
        raise DescriptorError(f"tensor {meta.name!r}: malformed sender_port")
    return _Handle(group, tag, backend, host, port)


class _Group:
    """One world-size-2 process group with one peer (gloo, plus NCCL for `.nccl`)."""

    def __init__(self, gid: str, rank: int, address: str = "", port: int = 0) -> None:
        self.gid = gid
        self.rank = rank
        self.address = address  # sender side: the peer's gRPC address
        self.port = port  # sender side: the peer's store port
        self.nccl_kind = gid.endswith(".nccl")
        self.local_ip = _running_future()  # sender side: goes in the handles
        self.ready = _running_future()  # set once the group is formed
        self.gloo: Any = None
        self.nccl: Any = None
        self.store: Any = None  # the peer's store, probed while a transfer is pending
        self.dead = False
        self._state = threading.Lock()
        self._probe = threading.Lock()
        self._tag = 0
        self.send_lock = threading.Lock()  # NCCL: one payload at a time, in sequence order
        self.send_seq = 0
        self.turn = threading.Condition()
        self.recv_seq = 0

    def next_tag(self) -> int:
        self._tag = self._tag % MAX_TAG + 1
        return self._tag

    def formed(self, gloo: Any, nccl: Any, store: Any) -> None:
        with self._state:
            self.gloo, self.nccl, self.store = gloo, nccl, store
            dead = self.dead
        if dead:
            self._shutdown(gloo, nccl)
            raise TransferError(f"process group {self.gid} dropped while it formed")

    def close(self) -> None:
        with self._state:
            if self.dead:
                return
            self.dead = True
            gloo, nccl = self.gloo, self.nccl
            self.store = None
        with self.turn:
            self.turn.notify_all()
        self._shutdown(gloo, nccl)

    @staticmethod
    def _shutdown(gloo: Any, nccl: Any) -> None:
        if nccl is not None:
            with contextlib.suppress(Exception):
                nccl.abort()
        if gloo is not None:
            with contextlib.suppress(Exception):
                gloo.shutdown()

    def live(self) -> None:
        if self.dead:
            raise TransferError(f"process group {self.gid} was dropped")

    def probe(self) -> None:
        """Raise unless the peer's store still answers."""
        with self._probe:
            self.live()
            store = self.store
            if store is not None:
                store.check(["alive"])


class TorchBackend(Backend):
    name = "torch"
    location = pb.TORCH
    pushes = True
    default_inline_below = 1 << 20
    option_help = {
        **inline_option(1 << 20),
        "host": "address this process's TCPStore listens on (default 0.0.0.0)",
        "store_port": "TCPStore port (default 0: any free port)",
        "connect_timeout_s": "seconds to form a process group with a peer (default 10)",
        "timeout_s": "seconds one payload's send or receive may take (default 30)",
    }

    def __init__(self, options: Mapping[str, str] | None = None, device: str = "cpu") -> None:
        super().__init__(options, device)
        if not (dist.is_available() and dist.is_gloo_available()):
            raise ImportError("torch.distributed with gloo is not available in this torch build")
        self.host = self.options.get("host", "0.0.0.0")
        try:
            store_port = int(self.options.get("store_port", "0"))
        except ValueError:
            raise ValueError("transport option store_port must be an integer") from None
        if not 0 <= store_port < 65536:
            raise ValueError("transport option store_port must be in 0..65535")
        self.connect_timeout_s = _float_option(self.options, "connect_timeout_s", 10.0)
        self.timeout_s = _float_option(self.options, "timeout_s", 30.0)
        self._device = torch.device(device)
        self._cuda = self._device.type == "cuda" and _nccl_available()
        if self._cuda and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._uid = secrets.token_hex(8)
        self._generation = 0
        self._devices: dict[str, Any] = {}
        self._devices_lock = threading.Lock()
        self._sending: dict[tuple[str, bool], _Group] = {}
        self._receiving: OrderedDict[str, _Group] = OrderedDict()
        self._dead: OrderedDict[str, None] = OrderedDict()
        self._closed = False
        self._store, self.port = self._listen(self.host, store_port)

    # ---- setup -------------------------------------------------------------

    def _listen(self, host: str, port: int) -> tuple[Any, int]:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)
            bound = int(sock.getsockname()[1])
            local = host
            if _unspecified(host):
                local = "::1" if family == socket.AF_INET6 else "127.0.0.1"
            store = dist.TCPStore(
                local,
                bound,
                None,
                True,
                timedelta(seconds=self.connect_timeout_s),
                wait_for_workers=False,
                master_listen_fd=sock.fileno(),
            )
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the store owns the listening socket now
        return store, bound

    def _gloo_device(self, hostname: str) -> Any:
        ifname = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
        key = f"if:{ifname}" if ifname else f"host:{hostname}"
        with self._devices_lock:
            device = self._devices.get(key)
            if device is None:
                create = dist.ProcessGroupGloo.create_device
                device = create(interface=ifname) if ifname else create(hostname=hostname)
                self._devices[key] = device
            return device

    def _form(self, group: _Group, store: Any, hostname: str, probe: Any) -> None:
        """Build the group's process groups (blocks until the peer joins)."""
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._devices = [self._gloo_device(hostname)]
        opts._timeout = timedelta(seconds=self.connect_timeout_s)
        opts._threads = 1
        prefix = f"{group.gid}/gloo" if group.nccl_kind else group.gid
        gloo = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), group.rank, 2, opts)
        nccl = None
        if group.nccl_kind:
            try:
                os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # abort, don't exit
                nopts = dist.ProcessGroupNCCL.Options()
                nopts._timeout = timedelta(seconds=self.timeout_s)
                nccl = dist.ProcessGroupNCCL(
                    dist.PrefixStore(f"{group.gid}/nccl", store), group.rank, 2, nopts
                )
            except BaseException:
                _Group._shutdown(gloo, None)
                raise
        group.formed(gloo, nccl, probe)

    def _create_sending(self, group: _Group, host: str) -> None:
        try:
            group.local_ip.set_result(_route_ip(host))
            store = dist.TCPStore(
                host, group.port, None, False, timedelta(seconds=self.connect_timeout_s)
            )
            self._form(group, store, group.local_ip.result(), store)
        except BaseException as err:
            if not group.local_ip.done():
                group.local_ip.set_result("")
            group.ready.set_exception(err)
        else:
            group.ready.set_result(None)

    def _create_receiving(self, group: _Group, sender_host: str, sender_port: int) -> None:
        hostname = _route_ip(sender_host) if sender_host else ""
        if not hostname and not _unspecified(self.host):
            hostname = self.host
        try:
            probe = None
            if sender_port:
                timeout = timedelta(seconds=self.connect_timeout_s)
                probe = dist.TCPStore(sender_host, sender_port, None, False, timeout)
            self._form(group, self._store, hostname, probe)
        except BaseException as err:
            group.ready.set_exception(err)
        else:
            group.ready.set_result(None)

    # ---- advertising -------------------------------------------------------

    def endpoint(self) -> str:
        if self._cuda:
            return f"port={self.port};cuda={_gpu_uuid(self._device)}"
        return f"port={self.port}"

    def reaches(self, peer: Peer) -> bool:
        return self.name in peer.accepts and parse_endpoint(peer.endpoint(self.name))[0] > 0

    # ---- sending -----------------------------------------------------------

    def _use_nccl(self, tensors: Sequence[torch.Tensor], peer_cuda: str | None) -> bool:
        if peer_cuda is None or not tensors or not _nccl_available():
            return False
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            return False
        (device,) = devices
        if device.type != "cuda":
            return False
        # NCCL refuses two ranks on one GPU: between processes sharing it, use gloo.
        return not (peer_cuda and peer_cuda == _gpu_uuid(device))

    def _sending_group(self, peer: Peer, port: int, nccl: bool) -> _Group:
        key = (peer.address, nccl)
        group = self._sending.get(key)
        failed = group is not None and group.ready.done() and group.ready.exception() is not None
        if group is not None and not group.dead and not failed and group.port == port:
            return group
        if group is not None:
            group.close()
        self._generation += 1
        gid = f"{self._uid}.{self._generation}" + (".nccl" if nccl else "")
        group = _Group(gid, 0, peer.address, port)
        self._sending[key] = group
        _in_thread(self._create_sending, group, peer.host)
        return group

    def _drop_sending(self, group: _Group) -> None:
        key = (group.address, group.nccl_kind)
        if self._sending.get(key) is group:
            del self._sending[key]
        group.close()

    async def publish(
        self, request_id: str, tensors: Mapping[str, torch.Tensor], peer: Peer
    ) -> Outgoing:
        if self._closed:
            raise TransferError("the torch transport is closed")
        if not tensors:
            return Outgoing([])
        port, peer_cuda = parse_endpoint(peer.endpoint(self.name))
        if not port:
            raise TransferError(f"{peer.address} advertises no torch endpoint")
        values = list(tensors.values())
        nccl = self._use_nccl(values, peer_cuda)
        group = self._sending_group(peer, port, nccl)
        sender_host = await _await(group.local_ip)
        # The receiver probes this process's store, where it listens on that address.
        reachable = sender_host and (_unspecified(self.host) or self.host == sender_host)
        port_here = self.port if reachable else 0
        backend = "nccl" if nccl else "gloo"
        tags = [group.next_tag() for _ in values]
        metas = [
            meta_for(
                name, t, pb.TORCH, encode_handle(group.gid, tag, backend, sender_host, port_here)
            )
            for (name, t), tag in zip(tensors.items(), tags, strict=True)
        ]
        held: list[torch.Tensor] = values
        started = False

        async def start() -> None:
            nonlocal started
            if started:
                return
            started = True
            await self._push(group, held, tags)

        async def release() -> None:
            held.clear()

        return Outgoing(metas, start=start, release=release)

    async def _push(self, group: _Group, tensors: list[torch.Tensor], tags: list[int]) -> None:
        try:
            group.live()
            await _await(group.ready, 2 * self.connect_timeout_s + 5)
            group.live()
            send = self._send_nccl if group.nccl_kind else self._send_gloo
            sending = _in_thread(send, group, list(tensors), tags)
            await self._watch(group, sending, f"torch send to {group.address}")
        except BaseException as err:
            self._drop_sending(group)
            if isinstance(err, TransferError | asyncio.CancelledError):
                raise
            if isinstance(err, Exception):
                raise TransferError(f"torch send to {group.address} failed: {err}") from err
            raise

    async def _watch(self, group: _Group, work: concurrent.futures.Future[T], what: str) -> T:
        """Wait for a send or receive, probing the peer while it is pending."""
        done = asyncio.wrap_future(work)
        deadline = time.monotonic() + self.timeout_s + 5
        try:
            while True:
                finished, _ = await asyncio.wait({done}, timeout=PROBE_S)
                if finished:
                    return done.result()
                if time.monotonic() > deadline:
                    raise TransferError(f"{what} timed out")
                try:
                    await _await(_in_thread(group.probe), self.connect_timeout_s)
                except TransferError:
                    raise
                except Exception as err:
                    raise TransferError(f"{what}: the peer went away: {err}") from err
        finally:
            done.cancel()  # a transfer left behind ends on its own timeout, unobserved

    def _send_gloo(self, group: _Group, tensors: list[torch.Tensor], tags: list[int]) -> None:
        group.live()
        timeout = timedelta(seconds=self.timeout_s)
        flats = [flat_bytes(t, host=True) for t in tensors if t.numel()]
        live_tags = [tag for t, tag in zip(tensors, tags, strict=True) if t.numel()]
        works = [group.gloo.send([f], 1, tag) for f, tag in zip(flats, live_tags, strict=True)]
        for work in works:
            work.wait(timeout)

    def _send_nccl(self, group: _Group, tensors: list[torch.Tensor], tags: list[int]) -> None:
        deadline = time.monotonic() + self.timeout_s
        if not group.send_lock.acquire(timeout=self.timeout_s):
            raise TransferError(f"NCCL group {group.gid}: timed out waiting for its turn")
        try:
            group.live()
            announce = torch.tensor([group.send_seq], dtype=torch.int64)
            group.send_seq += 1
            group.gloo.send([announce], 1, tags[0]).wait(timedelta(seconds=self.timeout_s))
            with torch.cuda.device(tensors[0].device):
                flats = [flat_bytes(t, host=False) for t in tensors if t.numel()]
                works = [group.nccl.send([f], 1, 0) for f in flats]
                self._poll(group, works, deadline)
        finally:
            group.send_lock.release()

    def _poll(self, group: _Group, works: list[Any], deadline: float) -> None:
        for work in works:
            while not work.is_completed():
                group.live()
                if time.monotonic() > deadline:
                    raise TransferError(f"NCCL group {group.gid}: timed out")
                time.sleep(NCCL_POLL_S)
            work.wait()

    def forget(self, address: str) -> None:
        for key in [k for k in self._sending if k[0] == address]:
            self._sending.pop(key).close()

    # ---- receiving ---------------------------------------------------------

    def _parse(self, metas: Sequence[pb.TensorMeta]) -> list[_Handle]:
        check_meta_sizes(metas)
        handles = []
        for meta in metas:
            if meta.location != pb.TORCH:
                raise DescriptorError(f"tensor {meta.name!r} is not a TORCH tensor")
            handles.append(_decode_handle(meta))
        if len({(h.group, h.backend, h.sender_host, h.sender_port) for h in handles}) > 1:
            raise DescriptorError("a payload's tensors must come from one process group")
        if len({h.tag for h in handles}) != len(handles):
            raise DescriptorError("a payload's tensors must have distinct tags")
        if len({m.name for m in metas}) != len(metas):
            raise DescriptorError("a payload's tensor names must be distinct")
        if handles and handles[0].backend == "nccl" and not self._cuda:
            raise DescriptorError("NCCL tensors sent to a process without CUDA")
        return handles

    def check(self, request_id: str, metas: Sequence[pb.TensorMeta]) -> None:
        self._parse(metas)

    async def _receiving_group(self, handle: _Handle) -> _Group:
        if self._closed:
            raise TransferError("the torch transport is closed")
        if handle.group in self._dead:
            raise TransferError(f"process group {handle.group} was dropped")
        group = self._receiving.get(handle.group)
        if group is None:
            group = _Group(handle.group, 1)
            self._receiving[handle.group] = group
            while len(self._receiving) > MAX_GROUPS:
                _, oldest = next(iter(self._receiving.items()))
                self._drop_receiving(oldest)
            _in_thread(self._create_receiving, group, handle.sender_host, handle.sender_port)
        else:
            self._receiving.move_to_end(handle.group)
        try:
            await _await(group.ready, self.connect_timeout_s + 5)
        except BaseException as err:
            self._drop_receiving(group)
            if isinstance(err, asyncio.CancelledError):
                raise
            raise TransferError(f"could not join process group {group.gid}: {err}") from err
        return group

    def _drop_receiving(self, group: _Group) -> None:
        if self._receiving.get(group.gid) is group:
            del self._receiving[group.gid]
        self._dead[group.gid] = None
        while len(self._dead) > MAX_DEAD:
            self._dead.popitem(last=False)
        group.close()

    async def fetch(
        self,
        request_id: str,
        metas: Sequence[pb.TensorMeta],
        inline: AsyncIterator[bytes],
    ) -> dict[str, torch.Tensor]:
        handles = self._parse(metas)
        if not metas:
            return {}
        group = await self._receiving_group(handles[0])
        recv = self._recv_nccl if group.nccl_kind else self._recv_gloo
        tags = [h.tag for h in handles]
        try:
            group.live()
            receiving = _in_thread(recv, group, list(metas), tags)
            return await self._watch(group, receiving, f"torch receive in {group.gid}")
        except BaseException as err:
            self._drop_receiving(group)
            if isinstance(err, TransferError | asyncio.CancelledError):
                raise
            if isinstance(err, Exception):
                raise TransferError(f"torch receive in {group.gid} failed: {err}") from err
            raise

    def _recv_gloo(
        self, group: _Group, metas: list[pb.TensorMeta], tags: list[int]
    ) -> dict[str, torch.Tensor]:
        timeout = timedelta(seconds=self.timeout_s)
        out = {m.name: empty_like_meta(m) for m in metas}
        works = [
            group.gloo.recv([flat_bytes(out[m.name], host=True)], 0, tag)
            for m, tag in zip(metas, tags, strict=True)
            if m.nbytes
        ]
        for work in works:
            work.wait(timeout)
        return out

    def _recv_nccl(
        self, group: _Group, metas: list[pb.TensorMeta], tags: list[int]
    ) -> dict[str, torch.Tensor]:
        deadline = time.monotonic() + self.timeout_s
        announce = torch.empty(1, dtype=torch.int64)
        group.gloo.recv([announce], 0, tags[0]).wait(timedelta(seconds=self.timeout_s))
        seq = int(announce.item())
        with group.turn:
            while group.recv_seq != seq:
                group.live()
                if not group.turn.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TransferError(f"NCCL group {group.gid}: payload {seq} never came up")
        try:
            with torch.cuda.device(self._device):
                out = {m.name: empty_like_meta(m, self._device) for m in metas}
                flats = [flat_bytes(out[m.name], host=False) for m in metas if m.nbytes]
                works = [group.nccl.recv([f], 0, 0) for f in flats]
                self._poll(group, works, deadline)
        finally:
            with group.turn:
                group.recv_seq = seq + 1
                group.turn.notify_all()
        return out

    # ---- shutdown ----------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        groups = list(self._sending.values()) + list(self._receiving.values())
        self._sending.clear()
        self._receiving.clear()
        for group in groups:
            group.close()
        self._devices.clear()
        self._store = None
