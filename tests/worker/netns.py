"""Network namespaces joined to one hub in the root namespace, with a bad network.

`Network(["encoder", ...])` gives each name its own namespace and address on a
/24 whose `.1` (`hub_address`) is in the root namespace; every packet between
two of them crosses that name's link, whose delay, jitter and loss `impair`
sets and `partition` cuts (100 % loss: sockets stay open, as on a real split).

Links are veth pairs on a bridge with `tc ... netem` on both ends when the
kernel has sch_netem. Where it does not (e.g. minimal VM kernels), each
namespace gets a TAP device instead and a thread here relays Ethernet frames
between them with the same impairments, netem's way (uniform jitter, which
reorders; independent loss): the kernels' TCP stacks still see a real lossy,
slow wire. `unavailable()` says why neither can be built; `close()` removes
everything, and names carry this process's id so a later run removes what a
killed run left.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass

PREFIX = "dfnet"  # namespaces: dfnet-<pid>-<tag>-<name>; bridge: dfb<tag>
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


class NetnsError(RuntimeError):
    pass


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        sh("ip", "netns", "add", probe)
    except NetnsError as err:
        return str(err)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if _has_netem() or os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return None
    return "the kernel has neither sch_netem nor /dev/net/tun"


def _has_netem() -> bool:
    if shutil.which("tc") is None:
        return False
    name = f"dfp{os.getpid() % 100000}"
    try:
        sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "b")
    except NetnsError:
        return False
    try:
        sh("tc", "qdisc", "add", "dev", name, "root", "netem", "delay", "1ms")
        return True
    except NetnsError:
        return False
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def remove_leftovers() -> None:
    """Namespaces (and bridges) of runs whose process is gone."""
    for line in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True
    ).stdout.split("\n"):
        m = re.match(rf"({PREFIX}-(\d+)-([0-9a-f]+)-\S+)", line)
        if m is None or _alive(int(m.group(2))):
            continue
        kill_namespace_processes(m.group(1))
        subprocess.run(["ip", "netns", "del", m.group(1)], capture_output=True)
        subprocess.run(["ip", "link", "del", f"dfb{m.group(3)}"], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_namespace_processes(ns: str) -> None:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _free_subnet() -> int:
    used = set(re.findall(r"inet 10\.77\.(\d+)\.", sh("ip", "-4", "-o", "addr", "show")))
    choices = [n for n in range(256) if str(n) not in used]
    if not choices:
        raise NetnsError("no free 10.77.x.0/24 subnet")
    return random.choice(choices)


@dataclass
class Impairment:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    cut: bool = False  # a partition: every packet lost

    def netem_args(self) -> list[str]:
        loss = 100.0 if self.cut else self.loss_pct
        return ["delay", f"{self.delay_ms}ms", f"{self.jitter_ms}ms", "loss", f"{loss}%"]


class Network:
    """One namespace per name, each linked to the hub; `close()` undoes it all."""

    def __init__(self, names: list[str], backend: str | None = None) -> None:
        remove_leftovers()
        self.tag = uuid.uuid4().hex[:6]
        self.backend = backend or ("netem" if _has_netem() else "userspace")
        subnet = _free_subnet()
        self.hub_address = f"10.77.{subnet}.1"
        self.namespaces = {n: f"{PREFIX}-{os.getpid()}-{self.tag}-{n}" for n in names}
        self.addresses = {n: f"10.77.{subnet}.{10 + i}" for i, n in enumerate(names)}
        self.impairments = {n: Impairment() for n in names}
        self._bridge = f"dfb{self.tag}"
        self._relay: _Relay | None = None
        self._up: list[str] = []
        try:
            for ns in self.namespaces.values():
                sh("ip", "netns", "add", ns)
                self._up.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            if self.backend == "netem":
                self._veths(subnet)
            else:
                self._taps(subnet)
        except BaseException:
            self.close()
            raise

    def _link(self, i: int) -> str:
        return f"df{self.tag}{i}"  # the root end of a name's link (15 characters at most)

    def _veths(self, subnet: int) -> None:
        sh("ip", "link", "add", self._bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.hub_address}/24", "dev", self._bridge)
        sh("ip", "link", "set", self._bridge, "up")
        for i, (name, ns) in enumerate(self.namespaces.items()):
            root_end = self._link(i)
            sh("ip", "link", "add", root_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", root_end, "master", self._bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            for tc, dev in self._netem_targets(name):
                sh(*tc, "qdisc", "add", "dev", dev, "root", "netem", "delay", "0ms")

    def _netem_targets(self, name: str) -> list[tuple[list[str], str]]:
        """`tc` and the device for both ends of a name's link (each shapes what it sends)."""
        i = list(self.namespaces).index(name)
        return [
            (["tc"], self._link(i)),
            (["ip", "netns", "exec", self.namespaces[name], "tc"], "eth0"),
        ]

    def _taps(self, subnet: int) -> None:
        hub = self._link(99)
        ports = {"hub": _open_tap(hub)}
        sh("ip", "addr", "add", f"{self.hub_address}/24", "dev", hub)
        sh("ip", "link", "set", hub, "up")
        for i, (name, ns) in enumerate(self.namespaces.items()):
            dev = self._link(i)
            ports[name] = _open_tap(dev)
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "link", "set", dev, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        self._relay = _Relay(ports, self.impairments)

    # ---- a bad network ---------------------------------------------------

    def impair(self, name: str, delay_ms: float, jitter_ms: float, loss_pct: float) -> None:
        cut = self.impairments[name].cut
        self.impairments[name] = Impairment(delay_ms, jitter_ms, loss_pct, cut)
        self._apply(name)

    def partition(self, name: str) -> None:
        self.impairments[name].cut = True
        self._apply(name)

    def heal(self, name: str) -> None:
        self.impairments[name].cut = False
        self._apply(name)

    def _apply(self, name: str) -> None:
        if self.backend != "netem":
            return  # the relay reads self.impairments for every frame
        netem = self.impairments[name].netem_args()
        for tc, dev in self._netem_targets(name):
            sh(*tc, "qdisc", "change", "dev", dev, "root", "netem", *netem)

    # ---- processes ---------------------------------------------------------

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[name]]

    def close(self) -> None:
        for ns in self._up:
            kill_namespace_processes(ns)
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        for ns in self._up:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._up = []
        subprocess.run(["ip", "link", "del", self._bridge], capture_output=True)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class _Relay:
    """An Ethernet switch in a thread: frames between TAP ports, each port's link
    delaying and dropping them as `impairments` says (the hub port is perfect)."""

    def __init__(self, ports: dict[str, int], impairments: dict[str, Impairment]) -> None:
        self._ports = ports
        self._names = {fd: name for name, fd in ports.items()}
        self._impairments = impairments
        self._macs: dict[bytes, str] = {}
        self._due: list[tuple[float, int, int, bytes]] = []
        self._seq = 0
        self._rng = random.Random()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="netns-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        for fd in self._ports.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _leg(self, name: str) -> float | None:
        """One link's delay for a frame, in seconds; None: the frame is lost."""
        imp = self._impairments.get(name)
        if imp is None:
            return 0.0
        if imp.cut or self._rng.random() * 100 < imp.loss_pct:
            return None
        jitter = self._rng.uniform(-imp.jitter_ms, imp.jitter_ms) if imp.jitter_ms else 0.0
        return max(0.0, imp.delay_ms + jitter) / 1000

    def _run(self) -> None:
        fds = list(self._ports.values())
        while not self._stopping.is_set():
            now = time.monotonic()
            while self._due and self._due[0][0] <= now:
                _, _, fd, frame = heapq.heappop(self._due)
                with contextlib.suppress(OSError):  # a full TAP queue drops, as a NIC would
                    os.write(fd, frame)
            wait = min(0.05, self._due[0][0] - now) if self._due else 0.05
            readable, _, _ = select.select(fds, [], [], max(wait, 0.0))
            for fd in readable:
                for _ in range(64):
                    try:
                        frame = os.read(fd, 65536)
                    except (BlockingIOError, OSError):
                        break
                    self._switch(self._names[fd], frame)

    def _switch(self, came_from: str, frame: bytes) -> None:
        if len(frame) < 14:
            return
        self._macs[frame[6:12]] = came_from
        known = self._macs.get(frame[0:6])
        targets = [known] if known is not None else [n for n in self._ports if n != came_from]
        up = self._leg(came_from)
        if up is None:
            return
        now = time.monotonic()
        for name in targets:
            if name == came_from:
                continue
            down = self._leg(name)
            if down is None:
                continue
            self._seq += 1
            heapq.heappush(self._due, (now + up + down, self._seq, self._ports[name], frame))


def die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the test process dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
