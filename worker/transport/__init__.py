"""How tensor bytes move between hops: one interface (base.py), one module per
backend, imported only when a process asks for it by name (a worker without
NIXL installed still runs gRPC)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from disagfusion.worker.transport.base import Backend

# name -> (module, class); the CRD's spec.transport.backend enum lists the same names.
BACKENDS: dict[str, tuple[str, str]] = {
    "grpc": ("disagfusion.worker.transport.grpc", "GrpcBackend"),
    "shm": ("disagfusion.worker.transport.shm", "ShmBackend"),
    "torch": ("disagfusion.worker.transport.torch", "TorchBackend"),
    "nixl": ("disagfusion.worker.transport.nixl", "NixlBackend"),
}


class TransportUnavailable(RuntimeError):
    """A backend that cannot run in this process (its library is missing)."""


def backend_class(name: str) -> type[Backend]:
    """The class of backend `name`, imported now; ValueError for an unknown name,
    TransportUnavailable when its library is not installed."""
    if name not in BACKENDS:
        raise ValueError(f"unknown transport {name!r} (known: {', '.join(BACKENDS)})")
    module_name, class_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TransportUnavailable(f"transport {name!r} cannot be used here: {err}") from err
    cls: type[Backend] = getattr(module, class_name)
    return cls


def check_options(name: str, options: Mapping[str, str]) -> None:
    """Raise ValueError naming any option backend `name` does not read (before a
    process starts anything)."""
    known = backend_class(name).option_help
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"transport {name!r} has no option {', '.join(unknown)} "
            f"(it knows: {', '.join(sorted(known)) or 'none'})"
        )


def open_backend(
    name: str, options: Mapping[str, str] | None = None, device: str = "cpu"
) -> Backend:
    """The backend called `name`, configured; raises ValueError for an unknown
    name or option, TransportUnavailable when its library is not installed."""
    return backend_class(name)(options, device)
