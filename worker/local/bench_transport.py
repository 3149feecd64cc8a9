"""`disagfusion bench transport`: how fast each transport backend moves one
payload's tensor bytes between two processes, next to a raw TCP socket.

Per backend, two fresh processes ("spawn") on loopback:
- a receiver serving a minimal Stage service: Health advertises its transports;
  Submit accepts the header, answers FETCHING for a pushing backend, fetches
  the tensor, answers RECEIVED, checks the bytes and answers DONE;
- a sender that publishes one uint8 tensor of each size and plays the stage
  runtime's side of the Submit stream (header and inline bytes, start() on
  FETCHING, release() after DONE). It must get the backend asked for: a
  fallback to grpc is an error.
One measurement: from publish to the RECEIVED ack, after `--warmup` unmeasured ones.

The baseline: this process sendall()s the same bytes from a preallocated buffer
to a receiver process that recv_into()s a preallocated buffer and answers one
byte; from the first send to that byte.

`--json` prints {"baseline": {size: result}, "backends": {name: {size: result}
or {"error": why}}}. A result is {"gbps", "p50_s", "p95_s"} (gbps: bytes / 1e9
/ median seconds; p95: nearest rank), plus "ratio" (gbps / the baseline's at
that size) for a backend. Exit status 1 when the baseline or a backend failed;
a backend that cannot run here (not installed) is an error entry, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import re
import signal
import socket
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import TYPE_CHECKING, Any

from disagfusion.cli.common import int_at_least, positive_float
from disagfusion.scheduling.stats import percentile

if TYPE_CHECKING:
    import torch

    from disagfusion.proto import disagfusion_pb2 as pb
    from disagfusion.worker.transport.base import Backend, Peer
    from disagfusion.worker.transport.wire import Transports

# The same names as disagfusion.worker.transport.BACKENDS (a test keeps them equal),
# spelled out so that building the CLI parser does not import torch.
BACKEND_NAMES = ("grpc", "shm", "torch", "nixl")
DEFAULT_SIZES = "4MiB,29MiB,64MiB"
MAX_SIZE = 8 << 30

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")

# ---- arguments (pure)


def parse_size(text: str) -> int:
    """Bytes in `text`: 4MiB, 512KiB, 1GiB, 1.5MiB, 10MB (decimal units) or
    1000000 (bytes). ArgumentTypeError for anything else."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size like 4MiB, 512KiB, 1GiB or 1000000 (bytes), got {text!r}"
        )
    nbytes = Fraction(match.group(1)) * _UNITS[match.group(2).lower()]
    if nbytes.denominator != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes")
    if not 1 <= nbytes <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"a size is 1 byte to 8GiB, got {text!r}")
    return int(nbytes)


def parse_sizes(text: str) -> list[tuple[str, int]]:
    """Comma-separated sizes, each kept with its label as written (the report's keys)."""
    labels = [label.strip() for label in text.split(",")]
    if not all(labels):
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes, got {text!r}")
    if len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"a size is listed twice in {text!r}")
    return [(label, parse_size(label)) for label in labels]


def parse_backends(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated backends, got {text!r}")
    unknown = [name for name in names if name not in BACKEND_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown transport {unknown[0]!r} (known: {', '.join(BACKEND_NAMES)})"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a backend is listed twice in {text!r}")
    return names


def add_transport_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"baseline": ..., "backends": ...} on stdout instead of a table',
    )
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=DEFAULT_SIZES,
        help="comma-separated payload sizes (4MiB, 512KiB, 1GiB, 1000000 bytes)",
    )
    p.add_argument(
        "--backends",
        type=parse_backends,
        default=",".join(BACKEND_NAMES),
        help="comma-separated transport backends to measure, in this order",
    )
    p.add_argument(
        "--iterations",
        type=int_at_least(1),
        default=10,
        help="measured transfers per backend and size",
    )
    p.add_argument(
        "--warmup",
        type=int_at_least(0),
        default=2,
        help="unmeasured transfers first, per backend and size",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the tensors live at both ends (cpu, cuda, cuda:1)",
    )
    p.add_argument(
        "--timeout-s",
        type=positive_float,
        default=60.0,
        help="time one backend (or the baseline) may take for all its sizes",
    )


# ---- results (pure)


@dataclass(frozen=True)
class Failure:
    """A backend (or the baseline) that produced no numbers. `unavailable`: it
    cannot run here at all (its library is missing), which is not a failure
    of the run."""

    reason: str
    unavailable: bool = False


def summarize(nbytes: int, times: Sequence[float]) -> dict[str, float]:
    """One size's result: throughput at the median time, and the median and p95 times."""
    p50 = statistics.median(times)
    return {
        "gbps": nbytes / 1e9 / p50 if p50 > 0 else float("inf"),
        "p50_s": p50,
        "p95_s": percentile(times, 95),
    }


Measured = dict[str, dict[str, float]]  # size label -> summary


def build_report(
    baseline: Measured | Failure, backends: dict[str, Measured | Failure]
) -> dict[str, Any]:
    """The --json object; a backend's sizes get `ratio` to the baseline at that size."""
    out: dict[str, Any] = {"baseline": _entry(baseline), "backends": {}}
    for name, result in backends.items():
        if isinstance(result, Failure):
            out["backends"][name] = _entry(result)
            continue
        sizes: dict[str, dict[str, float | None]] = {}
        for label, summary in result.items():
            base = baseline.get(label) if isinstance(baseline, dict) else None
            ratio = summary["gbps"] / base["gbps"] if base and base["gbps"] else None
            sizes[label] = {**summary, "ratio": ratio}
        out["backends"][name] = sizes
    return out


def _entry(result: Measured | Failure) -> dict[str, Any]:
    if isinstance(result, Failure):
        return {"error": result.reason}
    return dict(result)


def format_table(report: dict[str, Any]) -> str:
    rows = [f"{'backend':<9} {'size':>9} {'GB/s':>8} {'p50 s':>9} {'p95 s':>9} {'vs TCP':>7}"]

    def add(name: str, entry: dict[str, Any]) -> None:
        if "error" in entry:
            rows.append(f"{name:<9} error: {entry['error']}")
            return
        for label, r in entry.items():
            ratio = r.get("ratio")
            shown = "-" if name == "tcp" else "n/a" if ratio is None else f"{ratio:.2f}x"
            rows.append(
                f"{name:<9} {label:>9} {r['gbps']:8.3f} {r['p50_s']:9.5f} {r['p95_s']:9.5f}"
                f" {shown:>7}"
            )

    add("tcp", report["baseline"])
    for name, entry in report["backends"].items():
        add(name, entry)
    return "\n".join(rows)


# ---- the run (this process: orchestration and the TCP baseline's sender)


class BenchError(Exception):
    """A transfer that did not complete as the protocol says."""


def run_transport_bench(
    sizes: Sequence[tuple[str, int]],
    backends: Sequence[str],
    iterations: int,
    warmup: int,
    device: str = "cpu",
    timeout_s: float = 60.0,
) -> tuple[Measured | Failure, dict[str, Measured | Failure]]:
    ctx = multiprocessing.get_context("spawn")
    baseline = _run_baseline(ctx, sizes, iterations, warmup, timeout_s)
    results: dict[str, Measured | Failure] = {}
    for name in backends:
        result = _run_backend(ctx, name, sizes, iterations, warmup, device, timeout_s)
        if isinstance(result, Failure):
            print(f"{name}: {result.reason}", file=sys.stderr)
        results[name] = result
    return baseline, results


def run_transport_command(args: argparse.Namespace) -> int:
    baseline, results = run_transport_bench(
        args.sizes, args.backends, args.iterations, args.warmup, args.device, args.timeout_s
    )
    report = build_report(baseline, results)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    failed = [r for r in (baseline, *results.values()) if isinstance(r, Failure)]
    return 1 if any(not f.unavailable for f in failed) else 0


def _message(conn: Connection, proc: SpawnProcess, deadline: float, what: str) -> tuple[str, Any]:
    """The next (kind, value) a child sends; TimeoutError or BenchError when none comes."""
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"{what} gave no answer in time")
    try:
        message: tuple[str, Any] = conn.recv()
    except EOFError:
        proc.join(1)
        raise BenchError(f"{what} exited (code {proc.exitcode}) without an answer") from None
    return message


def _start(
    ctx: SpawnContext, target: Any, args: tuple[Any, ...], name: str
) -> tuple[Connection, SpawnProcess]:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), name=name)
    proc.start()
    child.close()  # the child's death then shows as EOF here
    return parent, proc


def _stop(conn: Connection, proc: SpawnProcess) -> None:
    """Ask a child to finish (it frees what it holds), then make sure it does."""
    with contextlib.suppress(OSError):
        conn.send("stop")
    for ending in (None, proc.terminate, proc.kill):
        if ending is not None:
            ending()
        proc.join(10)
        if proc.exitcode is not None:
            break
    conn.close()


def _run_backend(
    ctx: SpawnContext,
    name: str,
    sizes: Sequence[tuple[str, int]],
    iterations: int,
    warmup: int,
    device: str,
    timeout_s: float,
) -> Measured | Failure:
    deadline = time.monotonic() + timeout_s
    children: list[tuple[Connection, SpawnProcess]] = []
    try:
        children.append(_start(ctx, _receiver_main, (name, device), f"bench-{name}-receiver"))
        kind, value = _message(*children[0], deadline, f"the {name} receiver")
        if kind != "ready":
            return Failure(f"receiver: {value}", unavailable=kind == "unavailable")
        address = f"127.0.0.1:{value}"
        args = (name, address, list(sizes), iterations, warmup, device, deadline - time.monotonic())
        children.append(_start(ctx, _sender_main, args, f"bench-{name}-sender"))
        kind, value = _message(*children[1], deadline, f"the {name} sender")
        if kind != "ok":
            return Failure(f"sender: {value}", unavailable=kind == "unavailable")
        return {label: summarize(nbytes, value[label]) for label, nbytes in sizes}
    except (TimeoutError, BenchError) as err:
        return Failure(str(err))
    finally:
        for child in reversed(children):
            _stop(*child)


def _run_baseline(
    ctx: SpawnContext,
    sizes: Sequence[tuple[str, int]],
    iterations: int,
    warmup: int,
    timeout_s: float,
) -> Measured | Failure:
    deadline = time.monotonic() + timeout_s
    conn, proc = _start(ctx, _tcp_receiver_main, (), "bench-tcp-receiver")
    try:
        _, port = _message(conn, proc, deadline, "the TCP receiver")
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out: Measured = {}
            for label, nbytes in sizes:
                buf = memoryview(_pattern_bytes(nbytes))
                times = []
                for i in range(warmup + iterations):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the TCP baseline ran out of time")
                    sock.sendall(struct.pack("!Q", nbytes))
                    _recv_exact(sock, 1)  # the receiver has its buffer
                    start = time.perf_counter()
                    sock.sendall(buf)
                    _recv_exact(sock, 1)
                    if i >= warmup:
                        times.append(time.perf_counter() - start)
                out[label] = summarize(nbytes, times)
            sock.sendall(struct.pack("!Q", 0))
            return out
    except (OSError, TimeoutError, BenchError) as err:
        return Failure(f"TCP baseline: {type(err).__name__}: {err}")
    finally:
        _stop(conn, proc)


def _pattern_bytes(nbytes: int) -> bytearray:
    return bytearray((bytes(range(256)) * (nbytes // 256 + 1))[:nbytes])


def _recv_exact(sock: socket.socket, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        more = sock.recv(nbytes - len(data))
        if not more:
            raise BenchError("the peer closed the connection")
        data += more
    return data


# ---- the TCP baseline's receiver (a child process)


def _tcp_receiver_main(conn: Connection) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn.send(("ready", server.getsockname()[1]))
        sock, _ = server.accept()
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        while True:
            try:
                (nbytes,) = struct.unpack("!Q", _recv_exact(sock, 8))
            except BenchError:
                return
            if nbytes == 0:
                return
            if len(buf) < nbytes:
                buf = bytearray(nbytes)
            view = memoryview(buf)[:nbytes]
            sock.sendall(b"r")
            got = 0
            while got < nbytes:
                n = sock.recv_into(view[got:])
                if n == 0:
                    return
                got += n
            sock.sendall(b"a")


# ---- a backend's receiver (a child process): a real gRPC server, the Stage protocol


def _receiver_main(conn: Connection, name: str, device: str) -> None:
    try:
        asyncio.run(_serve(conn, name, device))
    except Exception as err:  # the parent reports it; the traceback helps with a bug
        _send_quietly(conn, ("error", f"{type(err).__name__}: {err}"))
        raise


def _send_quietly(conn: Connection, message: tuple[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.send(message)


async def _serve(conn: Connection, name: str, device: str) -> None:
    import grpc

    from disagfusion.worker.runtime.peers import SERVER_OPTIONS
    from disagfusion.worker.transport import TransportUnavailable
    from disagfusion.worker.transport.inline_wire import add_stage_servicer
    from disagfusion.worker.transport.wire import Transports

    try:
        transports = Transports.open(name, device=device)
    except TransportUnavailable as err:
        conn.send(("unavailable", str(err)))
        return
    try:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        add_stage_servicer(_stage_servicer(transports), server)
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            raise OSError("cannot listen on 127.0.0.1")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_reader(conn.fileno(), stop.set)  # "stop", or the parent went away
        conn.send(("ready", port))
        await stop.wait()
        loop.remove_reader(conn.fileno())
        await server.stop(grace=1)
    finally:
        await transports.close()


def _stage_servicer(transports: Transports) -> Any:
    from disagfusion.proto import disagfusion_pb2 as pb
    from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
    from disagfusion.worker.transport.wire import accept, fetch_tensors

    class BenchStage(pb_grpc.StageServicer):
        async def Health(self, request: pb.HealthRequest, context: object) -> pb.HealthReply:
            reply = pb.HealthReply(stage="bench", ready=True, queue_capacity=1)
            return transports.advertise(reply)

        async def Submit(
            self, request_iterator: AsyncIterator[pb.WorkChunk], context: object
        ) -> AsyncIterator[pb.Ack]:
            stream = request_iterator.__aiter__()
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                return
            rid = first.header.request_id
            if first.WhichOneof("kind") != "header":
                yield pb.Ack(status=pb.Ack.REJECTED, reason="the stream began without a header")
                return
            try:
                backend = accept(transports, first.header)
                if backend.pushes:
                    yield pb.Ack(request_id=rid, status=pb.Ack.FETCHING)
                tensors = await fetch_tensors(backend, first.header, stream)
            except Exception as err:
                reason = f"{type(err).__name__}: {err}"
                yield pb.Ack(request_id=rid, status=pb.Ack.REJECTED, reason=reason)
                return
            yield pb.Ack(request_id=rid, status=pb.Ack.RECEIVED)
            problem = check_pattern(rid, tensors)
            if problem:
                yield pb.Ack(request_id=rid, status=pb.Ack.REJECTED, reason=problem)
            else:
                yield pb.Ack(request_id=rid, status=pb.Ack.DONE)

    return BenchStage()


def request_id(size_index: int, nbytes: int, k: int) -> str:
    return f"bench-{size_index}-{nbytes}-{k}"


def check_pattern(rid: str, tensors: dict[str, torch.Tensor]) -> str:
    """Why the received tensor is not what the sender sent for `rid` ("" when it
    is): byte j of iteration k is (j + k) % 256, checked at a sample of places."""
    import torch

    *_, nbytes, k = rid.split("-")
    t = tensors.get("t")
    if t is None or t.dtype != torch.uint8 or t.numel() != int(nbytes):
        return (
            f"received {[(n, v.dtype, v.numel()) for n, v in tensors.items()]}, not {nbytes} bytes"
        )
    flat = t.reshape(-1)
    where = torch.arange(0, flat.numel(), 4093, device=flat.device)
    expected = ((where + int(k)) % 256).to(torch.uint8)
    if not torch.equal(flat[where], expected):
        return "the received bytes differ from the sent ones"
    return ""


# ---- a backend's sender (a child process)


def _sender_main(
    conn: Connection,
    name: str,
    address: str,
    sizes: list[tuple[str, int]],
    iterations: int,
    warmup: int,
    device: str,
    timeout_s: float,
) -> None:
    from disagfusion.worker.transport import TransportUnavailable

    try:
        times = asyncio.run(_send(name, address, sizes, iterations, warmup, device, timeout_s))
    except TransportUnavailable as err:
        _send_quietly(conn, ("unavailable", str(err)))
    except (BenchError, TimeoutError) as err:
        _send_quietly(conn, ("error", str(err) or type(err).__name__))
    except Exception as err:
        _send_quietly(conn, ("error", f"{type(err).__name__}: {err}"))
        raise
    else:
        _send_quietly(conn, ("ok", times))


async def _send(
    name: str,
    address: str,
    sizes: list[tuple[str, int]],
    iterations: int,
    warmup: int,
    device: str,
    timeout_s: float,
) -> dict[str, list[float]]:
    import grpc
    import torch

    from disagfusion.proto import disagfusion_pb2 as pb
    from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
    from disagfusion.worker.runtime.peers import CHANNEL_OPTIONS
    from disagfusion.worker.transport.inline_wire import submit_method
    from disagfusion.worker.transport.wire import Transports, peer_from_health

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    transports = Transports.open(name, device=device)
    try:
        async with (
            asyncio.timeout(timeout_s),
            grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel,
        ):
            stub = pb_grpc.StageStub(channel)
            stub.Submit = submit_method(channel)  # as the runtime's ChannelCache does
            peer = peer_from_health(address, await stub.Health(pb.HealthRequest()))
            backend, why = transports.choose(peer)
            if why or backend.name != name:
                raise BenchError(f"the sender fell back to {backend.name} ({why})")
            out: dict[str, list[float]] = {}
            for index, (label, nbytes) in enumerate(sizes):
                tensor = torch.arange(256, dtype=torch.uint8).repeat(nbytes // 256 + 1)[:nbytes]
                tensor = tensor.to(device).clone()
                times = out[label] = []
                for k in range(1, warmup + iterations + 1):
                    tensor.add_(1)  # byte j is now (j + k) % 256
                    if tensor.is_cuda:
                        torch.cuda.synchronize(tensor.device)
                    rid = request_id(index, nbytes, k)
                    elapsed = await transfer(stub, backend, peer, rid, tensor)
                    if k > warmup:
                        times.append(elapsed)
                del tensor
            return out
    finally:
        await transports.close()


async def transfer(
    stub: Any, backend: Backend, peer: Peer, rid: str, tensor: torch.Tensor
) -> float:
    """One payload as the stage runtime sends it; seconds from publish to RECEIVED."""
    import grpc

    from disagfusion.proto import disagfusion_pb2 as pb
    from disagfusion.worker.transport.wire import write_payload

    header = pb.WorkHeader(request_id=rid, pipeline="bench", source_stage="bench")
    start = time.perf_counter()
    outgoing = await backend.publish(rid, {"t": tensor}, peer)
    call = stub.Submit()
    helpers = [asyncio.create_task(write_payload(call, header, outgoing))]
    try:
        elapsed: float | None = None
        while True:
            ack = await _read_ack(call, helpers)
            if ack is grpc.aio.EOF:
                raise BenchError(f"{rid}: the stream ended before DONE")
            if ack.status == pb.Ack.FETCHING:
                helpers.append(asyncio.create_task(outgoing.start()))
            elif ack.status == pb.Ack.RECEIVED:
                elapsed = time.perf_counter() - start
            elif ack.status == pb.Ack.DONE:
                break
            else:
                name = pb.Ack.Status.Name(ack.status)
                raise BenchError(f"{rid}: the receiver answered {name}: {ack.reason}")
        if elapsed is None:
            raise BenchError(f"{rid}: DONE came without RECEIVED")
        await asyncio.gather(*helpers)  # their errors, if any
        return elapsed
    finally:
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        call.cancel()
        await outgoing.release()


async def _read_ack(call: Any, helpers: list[asyncio.Task[None]]) -> Any:
    """The next ack, or a helper's error (a write or push that failed would
    otherwise leave us waiting for an ack that never comes)."""
    read = asyncio.ensure_future(call.read())
    try:
        while True:
            for helper in helpers:
                if helper.done():
                    helper.result()  # raises its error
            pending = {read, *(h for h in helpers if not h.done())}
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                return read.result()
    finally:
        if not read.done():
            read.cancel()
