"""The embedded default: gateway and stage workers as local OS processes.

Every process is a child of the launcher, started with a parent-death signal
so none outlives it, in its own process group (a Ctrl-C in the terminal
reaches only the launcher, which then stops the children in order).

Supervision (`supervise`, called from the launcher's loop) restarts a child
that exits on its own on the same ports, with back-off (worker/restarts.py),
and gives up on one that keeps crashing; the upstream's custody re-sends what
a dead worker held, so accepted requests still complete.

Shutdown (`stop`) drains in pipeline order: the gateway stops admitting and
waits for the requests it accepted (answering what is left after its drain
timeout with an explicit error), then each stage is stopped after its
upstream has exited, so nothing in flight loses its next hop.

With `max_workers`, every stage gets ports for as many instances as the budget
allows up front, so each `--next` list and the gateway's topology already name
every possible instance (as a StatefulSet's DNS names do): absent ones are
simply skipped by the health polls, and instances come and go at runtime.

With `tls`, `plan` makes a throwaway CA (in memory only) and one certificate per
process in a private temporary directory, passes each child its three
`--tls-*` files, and `stop` removes the directory.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from disagfusion.worker.local.restarts import RestartPolicy, describe_exit, on_exit
from disagfusion.worker.params import STAGES

# Once the gateway has answered everything, a stage holds nothing: this is a
# bound for the odd leftover, after which the stage is killed.
STAGE_STOP_TIMEOUT_S = 10.0


# Ports handed out by this process: a child binds its port only seconds later,
# so a second call must not return the same one in the meantime.
_handed_out: set[int] = set()
_LOWEST_PORT = 10000


def _ephemeral_low() -> int:
    """The kernel's lowest ephemeral port: outgoing connections of any process
    take ports from there up, so a port below it cannot be taken by one
    between our check and the child's bind (seen in CI with ports from bind(0))."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, outside the ephemeral range where possible, and
    not handed out before by this process."""
    low = _ephemeral_low()
    if low > _LOWEST_PORT + 1000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(_LOWEST_PORT, low)
            if port not in _handed_out and port_is_free(port, host):
                _handed_out.add(port)
                return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    # Linux: SIGTERM this child when the launcher dies, even by SIGKILL.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    role: str
    grpc_port: int
    http_port: int
    argv: list[str]
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@dataclass
class LocalOptions:
    model: str = "builtin:tiny-unet"
    family: str = "auto"
    port: int = 8000
    encoders: int = 1
    denoisers: int = 1
    decoders: int = 1
    monolithic: int = 0  # > 0: the baseline, each process runs the whole pipeline
    overlap: bool = True
    handoff_delay_ms: float = 0.0
    handoff_jitter_ms: float = 0.0
    transport: str = "grpc"  # every process sends with it (grpc where a peer lacks it)
    transport_options: dict[str, str] = field(default_factory=dict)
    queue_capacity: int = 2
    # Batching and queue order of the stage workers (None: the worker's default).
    max_batch: int | None = None
    batch_wait_ms: float = 0.0
    queue_order: str | None = None
    slo: str | None = None  # the gateway stamps SLO deadlines with it (EDF's order)
    # (role, instance index) -> emulated slowdown of that worker (heterogeneous speeds)
    slowdown: dict[tuple[str, int], float] = field(default_factory=dict)
    threads: int | None = None  # torch threads per worker; None: share the cores
    max_waiting: int = 32
    request_timeout_s: float = 300.0
    pipeline: str = "local"
    log_dir: Path | None = None  # None: children write to this terminal
    extra_worker_args: list[str] = field(default_factory=list)
    max_workers: int = 0  # > 0: elastic, at most this many stage workers running at once
    drain_timeout_s: float = 130.0  # a removed worker is killed if still draining after this
    shutdown_drain_s: float = 60.0  # the gateway's time to finish accepted requests on stop
    served_model_name: str | None = None
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    # The gateway's video job store: passed on as given (the gateway's defaults
    # put SQLite beside the model cache, which outlives a restarted gateway).
    gateway_args: list[str] = field(default_factory=list)
    # mTLS between every process, with throwaway certificates (worker/security/certs.py).
    tls: bool = False
    tls_allow_plaintext_data: bool = False  # with tls: still allow torch/nixl bytes

    def counts(self) -> dict[str, int]:
        if self.monolithic:
            return {"monolithic": self.monolithic}
        return {"encoder": self.encoders, "denoiser": self.denoisers, "decoder": self.decoders}

    def slots(self) -> dict[str, int]:
        """Instances each role may reach: the budget less one for every other role."""
        counts = self.counts()
        if not self.max_workers:
            return counts
        spare = self.max_workers - (len(counts) - 1)
        return {role: max(n, spare) for role, n in counts.items()}


class LocalCluster:
    """Start, watch and stop a local disaggregated pipeline."""

    def __init__(
        self,
        opts: LocalOptions,
        report: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.opts = opts
        for role, count in opts.counts().items():
            if count < 1:
                raise ValueError(f"need at least one {role} process, got {count}")
        if opts.max_workers and sum(opts.counts().values()) > opts.max_workers:
            raise ValueError(
                f"{sum(opts.counts().values())} workers to start exceed max_workers"
                f" {opts.max_workers}"
            )
        self.gateway: Child | None = None
        self.workers: dict[str, list[Child]] = {}  # running (starting or ready), per role
        self.spare: dict[str, list[Child]] = {}  # planned slots with no process
        self.draining: list[Child] = []  # removed, SIGTERMed, not yet exited
        self._lock = threading.Lock()  # workers/spare/draining change from reaper threads
        self.given_up: list[Child] = []  # crashed too often; never restarted
        self._report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self._clock = clock
        self._exits: dict[str, tuple[float, ...]] = {}  # name -> recent unexpected exits
        self._restart_at: dict[str, float] = {}  # name -> when to start it again
        self._stopping = False
        self._hurry = threading.Event()  # a second stop signal: kill instead of draining
        self._dead_pids: list[int] = []  # processes replaced by a restart
        self.tls_dir: Path | None = None  # with opts.tls: the CA and every process's files

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.opts.port}"

    @property
    def children(self) -> list[Child]:
        kids = [c for role in self.workers.values() for c in role]
        return kids + ([self.gateway] if self.gateway else [])

    def _common_args(self, delay: bool = True) -> list[str]:
        o = self.opts
        args = ["--model", o.model, "--family", o.family, "--pipeline", o.pipeline]
        if o.transport != "grpc":
            args += ["--transport", o.transport]
            for key, value in o.transport_options.items():
                args += ["--transport-option", f"{key}={value}"]
        if delay and (o.handoff_delay_ms or o.handoff_jitter_ms):
            args += [
                "--handoff-delay-ms",
                str(o.handoff_delay_ms),
                "--handoff-jitter-ms",
                str(o.handoff_jitter_ms),
            ]
        return args

    def _batching_args(self) -> list[str]:
        o = self.opts
        args = [] if o.max_batch is None else ["--max-batch", str(o.max_batch)]
        if o.batch_wait_ms:
            args += ["--batch-wait-ms", str(o.batch_wait_ms)]
        return args + ([] if o.queue_order is None else ["--queue-order", o.queue_order])

    def threads_per_worker(self) -> int:
        """Split the cores between workers: oversubscribed torch threads stall each
        other (measured: a UNet step 20x slower with 2 threads per worker on 2 busy
        cores than with 1)."""
        if self.opts.threads:
            return self.opts.threads
        most = self.opts.max_workers or sum(self.opts.counts().values())
        return max(1, (os.cpu_count() or 1) // most)

    def plan(self) -> None:
        """Assign ports and command lines, downstream stages first."""
        o = self.opts
        python = [sys.executable, "-m", "disagfusion"]
        roles = ["monolithic"] if o.monolithic else list(STAGES)
        next_addrs: list[str] = []
        for role in reversed(roles):
            kids = []
            for i in range(o.slots()[role]):
                grpc_port, http_port = free_port(), free_port()
                argv = [
                    *python,
                    "worker",
                    "--role",
                    role,
                    "--port",
                    str(grpc_port),
                    "--http-port",
                    str(http_port),
                    "--queue-capacity",
                    str(o.queue_capacity),
                    *self._common_args(),
                    *o.extra_worker_args,
                ]
                if next_addrs:
                    argv += ["--next", ",".join(next_addrs)]
                if not o.overlap:
                    argv.append("--no-overlap")
                if role != "monolithic":
                    argv += self._batching_args()
                if o.slowdown.get((role, i), 1.0) > 1:
                    argv += ["--slowdown", str(o.slowdown[(role, i)])]
                argv += ["--threads", str(self.threads_per_worker())]
                kids.append(Child(f"{role}-{i}", role, grpc_port, http_port, argv))
            self.workers[role] = kids[: o.counts()[role]]
            self.spare[role] = kids[o.counts()[role] :]
            next_addrs = [k.address for k in kids]
        self.workers = {role: self.workers[role] for role in roles}
        topology = {
            role: [k.address for k in self.workers[role] + self.spare[role]] for role in roles
        }
        # Clients' Generate and the stages' results on two ports (the gateway serves
        # results only on --result-port).
        grpc_port, result_port = free_port(), free_port()
        self.gateway = Child(
            "gateway",
            "gateway",
            grpc_port,
            o.port,
            [
                *python,
                "gateway",
                "--port",
                str(o.port),
                "--grpc-port",
                str(grpc_port),
                "--result-port",
                str(result_port),
                "--topology",
                json.dumps(topology),
                "--max-queue",
                str(o.max_waiting),
                "--request-timeout",
                str(o.request_timeout_s),
                "--drain-timeout",
                str(o.shutdown_drain_s),
                *(["--served-model-name", o.served_model_name] if o.served_model_name else []),
                *(["--slo", o.slo] if o.slo else []),
                *o.gateway_args,
                *self._common_args(delay=False),
            ],
        )
        if o.tls:
            self._issue_certificates()

    def _issue_certificates(self) -> None:
        """One certificate per planned process (spare slots too), each child's
        `--tls-*` flags on its command line."""
        from disagfusion.worker.security.certs import LocalCA

        ca = LocalCA(f"disagfusion serve --local CA ({os.getpid()})")
        self.tls_dir = Path(tempfile.mkdtemp(prefix="disagfusion-tls-"))  # mode 0700
        planned = [c for kids in (*self.workers.values(), *self.spare.values()) for c in kids]
        for child in [*planned, *([self.gateway] if self.gateway else [])]:
            child.argv += ca.write(self.tls_dir, child.name).flags()
            if self.opts.tls_allow_plaintext_data:
                child.argv.append("--tls-allow-plaintext-data")

    def start(self) -> None:
        from disagfusion.worker.models import describe_model

        describe_model(
            self.opts.model, family=self.opts.family
        )  # build a builtin once, before N processes race for it
        if self.gateway is None:
            self.plan()
        if self.opts.log_dir:
            self.opts.log_dir.mkdir(parents=True, exist_ok=True)
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        if child.proc is not None:
            self._dead_pids.append(child.proc.pid)
        out = None
        if self.opts.log_dir:
            child.log_path = self.opts.log_dir / f"{child.name}.log"
            out = child.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        child.proc = subprocess.Popen(
            child.argv,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            preexec_fn=_die_with_parent,
            process_group=0,  # the terminal's Ctrl-C is the launcher's to handle
            env=env,
        )
        if out:
            out.close()

    def add_worker(self, role: str) -> Child:
        """Start one more instance of `role` in a free slot; RuntimeError when none is left."""
        with self._lock:
            spare = self.spare.get(role, [])
            for child in spare:
                if port_is_free(child.grpc_port) and port_is_free(child.http_port):
                    spare.remove(child)
                    self._spawn(child)
                    self.workers[role].append(child)
                    return child
        raise RuntimeError(f"no free slot for another {role} (all {self.opts.slots()[role]} used)")

    def remove_worker(self, role: str) -> Child:
        """SIGTERM the newest instance of `role` (it drains, then exits) without waiting.

        A background thread reaps it and frees its slot; the last instance of a
        role is never removed."""
        with self._lock:
            running = self.workers.get(role, [])
            if len(running) <= 1:
                raise ValueError(f"refusing to remove the last {role}")
            child = running.pop()
            self.draining.append(child)
        if child.proc is not None and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
        threading.Thread(target=self._reap, args=(child,), daemon=True).start()
        return child

    def _reap(self, child: Child) -> None:
        if child.proc is not None:
            try:
                child.proc.wait(self.opts.drain_timeout_s)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        with self._lock:
            if child in self.draining:
                self.draining.remove(child)
                self.spare[child.role].insert(0, child)

    def exited(self) -> list[Child]:
        return [c for c in self.children if c.proc is not None and c.proc.poll() is not None]

    # ---- supervision ------------------------------------------------------

    def supervise(self) -> None:
        """Restart children that exited on their own; give up on crash loops.

        Raises StageLost when a stage (or the gateway) has no instance left."""
        if self._stopping:
            return
        now = self._clock()
        with self._lock:
            for child in self.children:
                if child.name in self._restart_at:
                    if now >= self._restart_at[child.name]:
                        del self._restart_at[child.name]
                        self._report(f"restarting {child.name}")
                        self._spawn(child)
                elif child.proc is not None and child.proc.poll() is not None:
                    self._after_exit(child, now)
            # A child the autoscaler removed is no longer supervised.
            running = {c.name for c in self.children}
            for name in list(self._restart_at):
                if name not in running:
                    del self._restart_at[name]
        lost = [role for role, kids in self.workers.items() if not kids]
        if self.gateway is None or self.gateway in self.given_up:
            lost.insert(0, "gateway")
        if lost:
            raise StageLost(f"no {', '.join(lost)} instance left; stopping")

    def _after_exit(self, child: Child, now: float) -> None:
        code = child.proc.returncode if child.proc else None
        decision = on_exit(self._exits.get(child.name, ()), now, self.opts.restart_policy)
        self._exits[child.name] = decision.exits
        policy = self.opts.restart_policy
        if decision.give_up:
            self.given_up.append(child)
            if child in self.workers.get(child.role, []):
                self.workers[child.role].remove(child)
            self._report(
                f"{child.name} exited ({describe_exit(code)}) after {policy.max_restarts}"
                f" restarts within {policy.window_s:g}s; giving up on it" + self._tail(child, 5)
            )
            return
        self._restart_at[child.name] = now + decision.delay_s
        self._report(
            f"{child.name} exited unexpectedly ({describe_exit(code)}); restarting in"
            f" {decision.delay_s:g}s (restart {decision.attempt} of {policy.max_restarts}"
            f" within {policy.window_s:g}s)"
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.children)
        while pending:
            for child in self.exited():
                code = child.proc.returncode if child.proc else None
                raise RuntimeError(f"{child.name} exited with code {code}" + self._tail(child))
            pending = [c for c in pending if not _is_ready(c.http_url)]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(
                    "not ready after {:.0f}s: {}".format(
                        timeout_s, ", ".join(c.name for c in pending)
                    )
                )
            if pending:
                time.sleep(0.2)

    def _tail(self, child: Child, lines: int = 20) -> str:
        if child.log_path and child.log_path.exists():
            text = child.log_path.read_text(errors="replace").splitlines()[-lines:]
            return "\n" + "\n".join(text)
        return ""

    def stop(self) -> None:
        """Stop in pipeline order: the gateway drains first, then each stage in turn.

        Each phase is SIGTERM, a bounded wait, then SIGKILL; `hurry()` (a
        second Ctrl-C) cuts every wait short."""
        self._stopping = True
        with self._lock:
            phases: list[tuple[list[Child], float]] = [
                ([self.gateway] if self.gateway else [], self.opts.shutdown_drain_s + 15.0)
            ]
            for role, kids in self.workers.items():
                leaving = [c for c in self.draining if c.role == role]
                phases.append((kids + leaving, STAGE_STOP_TIMEOUT_S))
        for children, timeout_s in phases:
            self._stop_phase(children, timeout_s)
        if self.opts.transport == "shm":
            self._remove_shared_memory()
        if self.tls_dir is not None:
            shutil.rmtree(self.tls_dir, ignore_errors=True)
            self.tls_dir = None

    def _remove_shared_memory(self) -> None:
        """Segments a killed child published and nobody fetched (a clean exit
        removes its own): gone once the whole pipeline has stopped."""
        from disagfusion.worker.transport.shm import remove_segments_of

        pids = {c.proc.pid for c in self.children + self.draining if c.proc is not None}
        pids |= set(self._dead_pids)
        removed = remove_segments_of(pids)
        if removed:
            self._report(f"removed {removed} shared memory segment(s) left by killed workers")

    def hurry(self) -> None:
        """Make a running `stop` kill what is left instead of waiting for it to drain."""
        self._hurry.set()

    def _stop_phase(self, children: list[Child], timeout_s: float) -> None:
        alive = [c for c in children if c.proc is not None and c.proc.poll() is None]
        for child in alive:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while alive and time.monotonic() < deadline and not self._hurry.is_set():
            alive = [c for c in alive if c.proc is not None and c.proc.poll() is None]
            time.sleep(0.05)
        for child in alive:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.kill()
            if child.proc is not None:
                child.proc.wait()

    def __enter__(self) -> LocalCluster:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StageLost(RuntimeError):
    """A stage (or the gateway) has no instance left: the pipeline cannot serve."""


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def cli_path() -> str:
    """How to call the `disagfusion` script from here, venv activated or not."""
    script = Path(sys.executable).parent / "disagfusion"
    if shutil.which("disagfusion") == str(script) or not script.exists():
        return "disagfusion"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def example_commands(url: str, size: str, video: bool = False) -> Sequence[str]:
    if video:
        return (
            f'{cli_path()} generate --video "a fox running" -o fox.mp4 --url {url}',
            f"curl -s {url}/v1/videos -F prompt='a fox running' -F size={size}",
        )
    return (
        f'{cli_path()} generate "a red fox" -o fox.png --url {url}',
        f"curl -s {url}/v1/images/generations -H 'Content-Type: application/json' "
        f'-d \'{{"prompt": "a red fox", "size": "{size}"}}\'',
    )
