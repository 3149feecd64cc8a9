"""Who may deliver to whom (pure).

Independent of TLS, each hop checks the `source_stage` a submission names: a
stage takes work only from its upstream (the encoder, and a monolithic worker,
from the gateway), and the gateway takes a finished result only from the last
stage; any stage may fail a request, so an error result may come from any.
A forged sender inside the cluster still has to name the right stage, but it
can no longer feed a denoiser directly or answer for the decoder from elsewhere
in the pipeline, and together with the gateway's own check (it answers only
requests it owns and has not answered) a stray or replayed result changes nothing.
"""

from __future__ import annotations

from disagfusion.scheduling.stages import STAGES

GATEWAY = "gateway"
MONOLITHIC = "monolithic"


def upstream_of(role: str) -> str:
    """The only `source_stage` a `role` worker accepts work from."""
    if role == MONOLITHIC or role == STAGES[0]:
        return GATEWAY
    return STAGES[STAGES.index(role) - 1]


def may_deliver_result(source_stage: str, is_error: bool) -> bool:
    """Whether the gateway takes a result from `source_stage`."""
    if is_error:
        return source_stage in (*STAGES, MONOLITHIC)
    return source_stage in (STAGES[-1], MONOLITHIC)
