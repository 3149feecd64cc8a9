"""What the stage runtime asks of a model to batch: one call for several requests.

A loaded stage (`StageCompute` in serve.py) runs a list of requests in as few
pipeline calls as their batch keys allow and answers per request; a plain
function of one request (tests, simple models) is wrapped to run them one by
one and never batches.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Protocol, runtime_checkable

import torch

from disagfusion.worker.params import GenerationParams

Tensors = dict[str, torch.Tensor]
# One request's result, or what ended it (StageInputError, RequestCancelled, ...).
Outcome = Tensors | Exception
ComputeFn = Callable[[GenerationParams, Tensors], Tensors]
Request = tuple[GenerationParams, Tensors]


@runtime_checkable
class BatchCompute(Protocol):
    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        """One outcome per request, in order; a bad request never fails the others."""
        ...

    def batch_key(self, params: GenerationParams, tensors: Tensors) -> Hashable | None:
        """Requests with equal keys may share a call; None: this one never does."""
        ...

    def default_max_batch(self) -> int:
        """Requests per call when the worker is not told (--max-batch)."""
        ...


class OneByOne:
    """A function of one request as a BatchCompute that never batches."""

    def __init__(self, fn: ComputeFn) -> None:
        self._fn = fn

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        out: list[Outcome] = []
        for params, tensors in requests:
            try:
                out.append(self._fn(params, tensors))
            except Exception as err:
                out.append(err)
        return out

    def batch_key(self, params: GenerationParams, tensors: Tensors) -> Hashable | None:
        return None

    def default_max_batch(self) -> int:
        return 1


def input_bound(compute: object) -> int | None:
    """The model's own bound on the tensor bytes of one request's inputs, where the
    compute knows one (a loaded stage model does: `max_input_bytes`)."""
    bound = getattr(compute, "max_input_bytes", None)
    return int(bound()) if callable(bound) else None


def as_batch_compute(compute: BatchCompute | ComputeFn) -> BatchCompute:
    return compute if isinstance(compute, BatchCompute) else OneByOne(compute)
