"""The events of ``metrics.jsonl``: one tagged msgspec union, shared by the writer and every reader.

Each line of a run's (or a client's) ``metrics.jsonl`` is one of these Structs, tagged by its
``event`` field. :class:`~unitedllm.tracking.metrics.MetricsLog` checks what it writes against
them; :func:`decode_event` reads a line back (the report, and anything that reads runs next).
Fields are only ever added with defaults, and readers ignore fields they do not know, so a file
written by an older or newer UnitedLLM still reads. The JSON Schema is generated from these
types into ``schemas/metrics-event.schema.json`` (``python -m unitedllm.schemas``).

Who writes what: the aggregator (rank 0) writes ``round_start``, ``round``, ``train`` and
``eval`` as clients report them, ``rejected``, ``client_joined``, ``client_error``,
``round_start_resent``, ``resume``, ``warning`` and ``run_end``; a client writes its own ``train``, ``eval``,
``checkpoint``, ``resent`` and ``run_end``; both write ``system`` samples when enabled.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

__all__ = [
    "EVENT_TYPES",
    "AggregatorPhases",
    "ClientPhases",
    "CheckpointEvent",
    "ClientErrorEvent",
    "ClientJoinedEvent",
    "EvalEvent",
    "MetricEvent",
    "ResentEvent",
    "RejectedEvent",
    "ResumeEvent",
    "RoundEvent",
    "RoundStartEvent",
    "RoundStartResentEvent",
    "RunEndEvent",
    "SystemEvent",
    "TrainEvent",
    "WarningEvent",
    "decode_event",
    "events_schema",
]

Count = Annotated[int, Meta(ge=0)]
Rank = Annotated[int, Meta(ge=0)]
Value = float | None  # NaN and infinities are written as null


def _seconds(what: str) -> Meta:
    return Meta(ge=0, description=f"Seconds spent {what}.")


class ClientPhases(msgspec.Struct, kw_only=True):
    """Where a client's round went (:mod:`unitedllm.phases`): seconds per phase, from the round's start
    message to its update sent. The phases do not overlap, so they sum to no more than the round's time.
    """

    fetch: Annotated[float, _seconds("downloading the global model (and the round's extras)")] = 0.0
    decode: Annotated[float, _seconds("decoding the global model")] = 0.0
    setup: Annotated[float, _seconds("setting up local training: loading weights, building the trainer")] = (
        0.0
    )
    wait: Annotated[float, _seconds("waiting for a model shared with other ranks of this process")] = 0.0
    train: Annotated[float, _seconds("in local training steps")] = 0.0
    evaluate: Annotated[float, _seconds("evaluating the global model received and the local model")] = 0.0
    encode: Annotated[float, _seconds("computing and encoding the update (comm_args.update_codec)")] = 0.0
    upload: Annotated[float, _seconds("uploading the update")] = 0.0
    checkpoint: Annotated[float, _seconds("saving checkpoints and the client's journal")] = 0.0


class AggregatorPhases(msgspec.Struct, kw_only=True):
    """Where the aggregator's round went (:mod:`unitedllm.phases`): seconds per phase, from sending the
    global model to the round's resume point on disk. Fetching and decoding updates overlap folding
    them (updates fetched at once count once); the rest do not overlap. Waiting for clients is in no
    phase.
    """

    broadcast: Annotated[float, _seconds("sending the global model to the selected clients")] = 0.0
    fetch: Annotated[float, _seconds("downloading the clients' updates")] = 0.0
    decode: Annotated[float, _seconds("decoding the clients' updates")] = 0.0
    fold: Annotated[float, _seconds("checking and folding updates into the round's sum")] = 0.0
    finish: Annotated[float, _seconds("finishing the round: the server optimizer's step")] = 0.0
    wait: Annotated[float, _seconds("waiting for a model shared with clients of this process")] = 0.0
    evaluate: Annotated[float, _seconds("evaluating the new global model")] = 0.0
    checkpoint: Annotated[
        float, _seconds("saving the round's checkpoint, encoding the model, the resume point")
    ] = 0.0


class Event(msgspec.Struct, kw_only=True, tag_field="event"):
    """What every line has: the round (null when the event belongs to none), the rank, the wall-clock time."""

    round: int | None = None
    rank: Rank
    #: Seconds since the epoch, rounded to milliseconds.
    time: float | None = None


class TrainEvent(Event, tag="train"):
    """A client's local round: written by the client, and by the aggregator when the update arrives.

    ``bytes_sent``/``bytes_received`` are the writer's own view: a client's upload and download; the
    aggregator writes the update's size as ``bytes_received``. ``metrics`` is what the trainer reported.
    """

    split: str = "train"
    loss: Value = None
    samples: Value = None
    seconds: Value = None
    bytes_sent: Value = None
    bytes_received: Value = None
    #: The update's delta blob as sent, in bytes (after ``comm_args.update_codec``).
    update_bytes: Value = None
    #: Where the client's round went (absent in runs written before phases were recorded).
    phases: ClientPhases | None = None
    #: What the trainer reported (numbers, from a user's trainer possibly more).
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)


class EvalEvent(Event, tag="eval"):
    """An evaluation: of the global model (``model: global``) or of a client's local model."""

    split: str = "test"
    model: str = "global"
    loss: Value = None
    samples: Value = None
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)
    per_category: dict[str, Any] = msgspec.field(default_factory=dict)


class RoundStartEvent(Event, tag="round_start"):
    """The aggregator sent a round's global model to the selected clients."""

    selected: list[int] = msgspec.field(default_factory=list)
    #: The global model's blob as sent to each client, in bytes.
    global_bytes: Value = None


class RoundEvent(Event, tag="round"):
    """A finished round, as the aggregator saw it."""

    selected: list[int] = msgspec.field(default_factory=list)
    aggregated: list[int] = msgspec.field(default_factory=list)
    #: Rank -> why its update was left out.
    rejected: dict[int, str] = msgspec.field(default_factory=dict)
    train_loss: Value = None
    eval_loss: Value = None
    #: The round's wall time on the aggregator: from sending the global model to the resume point on disk.
    seconds: Value = None
    aggregation_seconds: Value = None
    #: Where the aggregator's round went (absent in runs written before phases were recorded).
    phases: AggregatorPhases | None = None


class WarningEvent(Event, tag="warning"):
    """Something a user should look at that did not stop the run; ``kind`` says what.

    ``loss_rise`` (:mod:`unitedllm.instability`): the global eval loss of ``round`` rose more than
    ``threshold`` nats over that of ``previous_round``.
    """

    kind: str = ""
    message: str = ""
    previous_round: int | None = None
    previous_loss: Value = None
    loss: Value = None
    threshold: Value = None


class RejectedEvent(Event, tag="rejected"):
    """An update the aggregator refused, and why."""

    reason: str = ""


class ClientErrorEvent(Event, tag="client_error"):
    """A client reported an error to the aggregator."""

    message: str = ""


class ClientJoinedEvent(Event, tag="client_joined"):
    """A client said hello with the right base model."""


class RoundStartResentEvent(Event, tag="round_start_resent"):
    """A client restarted while its round was open and was sent the round's start again."""


class ResumeEvent(Event, tag="resume"):
    """The aggregator resumed the run after ``round``."""


class RunEndEvent(Event, tag="run_end"):
    """The run finished: the aggregator names its output folder, a client why it stopped."""

    output_dir: str | None = None
    reason: str | None = None


class CheckpointEvent(Event, tag="checkpoint"):
    """A client saved a model folder."""

    path: str = ""


class ResentEvent(Event, tag="resent"):
    """A client sent a round's update again (from its journal) instead of training it again."""

    #: sha256 of the update's bytes.
    delta: str = ""


class SystemEvent(Event, tag="system"):
    """A system sample; the line also holds ``gpu<i>_mem_used_gb`` / ``gpu<i>_util_percent`` per GPU."""

    sample: Count = 0
    elapsed_s: Value = None
    cpu_percent: Value = None
    ram_used_gb: Value = None
    ram_percent: Value = None
    process_rss_gb: Value = None
    process_cpu_percent: Value = None
    process_gpu_mem_allocated_gb: Value = None
    process_gpu_mem_reserved_gb: Value = None


MetricEvent = (
    TrainEvent
    | EvalEvent
    | RoundStartEvent
    | RoundEvent
    | RejectedEvent
    | ClientErrorEvent
    | ClientJoinedEvent
    | RoundStartResentEvent
    | ResumeEvent
    | RunEndEvent
    | CheckpointEvent
    | ResentEvent
    | SystemEvent
    | WarningEvent
)

#: Event name -> its Struct.
EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        TrainEvent,
        EvalEvent,
        RoundStartEvent,
        RoundEvent,
        RejectedEvent,
        ClientErrorEvent,
        ClientJoinedEvent,
        RoundStartResentEvent,
        ResumeEvent,
        RunEndEvent,
        CheckpointEvent,
        ResentEvent,
        SystemEvent,
        WarningEvent,
    )
}

_DECODER: msgspec.json.Decoder[MetricEvent] = msgspec.json.Decoder(MetricEvent)


def decode_event(line: bytes | str) -> MetricEvent | None:
    """One line of ``metrics.jsonl`` as its event; None for a line of an event this version does not know.

    Raises :class:`msgspec.DecodeError` for a line that is not JSON or holds a known event with
    values of the wrong type (a damaged line, or one torn while the run writes).
    """
    try:
        return _DECODER.decode(line)
    except msgspec.ValidationError:
        raw = msgspec.json.decode(line)
        if isinstance(raw, dict) and isinstance(raw.get("event"), str) and raw["event"] not in EVENT_TYPES:
            return None
        raise


def events_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one ``metrics.jsonl`` line."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:unitedllm:schema:metrics-event",
        "title": "UnitedLLM metrics.jsonl event",
        "description": "One line of a run's metrics.jsonl. Generated from unitedllm.tracking.events; "
        "do not edit by hand.",
        **msgspec.json.schema(MetricEvent),
    }
