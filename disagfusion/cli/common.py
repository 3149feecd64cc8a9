"""What every `disagfusion` subcommand's parser shares: help that shows defaults,
and usage mistakes as one line."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from disagfusion.worker.runtime.sender import HandoffDelay


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter that keeps a description's layout and leaves out
    `(default: None)`: a flag whose default is None says what it is in its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.required or "default" in text:
            return text
        return super()._get_help_string(action)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make usage mistakes one `prog: error: ...` line, exit status 2: argparse's
    default prints the whole usage first, which buries the message."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


# ---- argument types: a bad value is argparse's one-line error, never a traceback


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def port(text: str) -> int:
    value = int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (NaN and infinity refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


HELP = HelpFormatter  # every flag shows its default

# What each extra (pyproject.toml) brings, by import name.
EXTRA_MODULES = {
    "worker": ("torch", "diffusers", "transformers", "accelerate", "aiohttp", "PIL", "pynvml"),
    "operator": ("kopf", "kubernetes"),
    "plot": ("matplotlib",),
}


def extra_of(module: str) -> str | None:
    """The extra that installs `module` (a dotted name is fine), if one does."""
    root = module.split(".")[0]
    return next((extra for extra, mods in EXTRA_MODULES.items() if root in mods), None)


def require_extra(extra: str) -> None:
    """Raise ModuleNotFoundError for the first module of `extra` not installed, before
    a command starts anything (main() turns it into a one-line hint)."""
    for module in EXTRA_MODULES[extra]:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


DEFAULT_MODEL = "builtin:tiny-unet"


def add_handoff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--handoff-delay-ms",
        type=non_negative_float,
        default=0.0,
        help="emulated network time added to every hand-off (benchmarks)",
    )
    p.add_argument(
        "--handoff-jitter-ms",
        type=non_negative_float,
        default=0.0,
        help="uniform jitter around --handoff-delay-ms",
    )


QUEUE_ORDERS = ("fifo", "edf")  # scheduling/queue_order.py (a test keeps them equal)


def add_batching_args(p: argparse.ArgumentParser) -> None:
    """Dynamic batching and queue order of the stage workers."""
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=None,
        help="requests one pipeline call may take (1: no batching; default: by model and"
        " device, 4 for image models on CPU and 8 on GPUs, 1 for video denoising and"
        " decoding)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=non_negative_float,
        default=0.0,
        help="how long a batch's first request waits for more (0: batch only what is"
        " already queued, never adding idle time)",
    )
    p.add_argument(
        "--queue-order",
        choices=QUEUE_ORDERS,
        default="fifo",
        help="fifo: arrival order; edf: earliest SLO deadline first (the gateway's --slo),"
        " with an aging bound so nothing starves",
    )


TRANSPORTS = ("grpc", "shm", "torch", "nixl")  # worker/transport BACKENDS


def add_transport_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="grpc",
        help="how tensor bytes move to the next hop: grpc (inline, anywhere), shm (same "
        "host), torch (torch.distributed: gloo, NCCL between GPUs), nixl (UCX); a receiver "
        "that does not accept it gets grpc",
    )
    p.add_argument(
        "--transport-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_key_value,
        help="a setting of the --transport backend (repeatable)",
    )


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def transport_settings(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """--transport and its options, checked (SystemExit with the reason when the
    backend cannot run here or an option is unknown)."""
    from disagfusion.worker.transport import TransportUnavailable, check_options

    options = dict(args.transport_option)
    try:
        check_options(args.transport, options)
    except (ValueError, TransportUnavailable) as err:
        raise SystemExit(f"error: --transport: {err}") from None
    return args.transport, options


def handoff_delay(args: argparse.Namespace) -> HandoffDelay:
    from disagfusion.worker.runtime.sender import HandoffDelay

    return HandoffDelay(args.handoff_delay_ms / 1e3, args.handoff_jitter_ms / 1e3)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="builtin:NAME, a local diffusers directory, or a hub id in the local HF cache",
    )
    from disagfusion.worker.models.families import ALIASES, FAMILIES

    p.add_argument(
        "--family",
        default="auto",
        choices=("auto", *FAMILIES, *ALIASES),
        help="the model family the deployment expects; a model of another family is refused"
        " (auto: whatever model_index.json says)",
    )


def add_job_store_args(p: argparse.ArgumentParser) -> None:
    """Where a video model's jobs live (the Videos API)."""
    p.add_argument(
        "--data-dir",
        default=None,
        help="video models: the SQLite job store's folder, finished videos included"
        " (default: jobs/ beside the model cache)",
    )
    p.add_argument(
        "--job-store",
        default=None,
        help="video models: sqlite:///FOLDER or redis://[:PASSWORD@]HOST:PORT/DB, shared by"
        " several gateways (default: $DISAGFUSION_JOB_STORE, then SQLite in --data-dir)",
    )
    p.add_argument(
        "--video-retention",
        type=positive_float,
        default=86400.0,
        help="seconds a finished video stays downloadable before it is deleted",
    )


def add_served_name(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--served-model-name",
        default=None,
        help="public model id in /v1/models and requests (default: the model's display name;"
        " the --model string is always accepted too)",
    )
