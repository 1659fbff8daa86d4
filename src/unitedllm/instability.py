"""Instability check: a global eval loss that rises sharply from one evaluated round to the next.

A server rule with momentum (DiLoCo, FedAvgM) or too large a server learning rate can
overshoot: the global model gets worse for a round before it recovers, or diverges. A run
should say so rather than leave it to whoever reads the loss column. The check is a pure
function of the rounds' eval losses: the latest evaluated round is compared with the one
evaluated before it, and a rise of more than ``validation_args.loss_rise_warning`` nats
(default 0.1; null turns it off) is reported as a ``warning`` event in ``metrics.jsonl``,
shown in the progress line and in the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unitedllm.rounds import RoundSummary
    from unitedllm.tracking.metrics import MetricsLog

__all__ = ["DEFAULT_LOSS_RISE_NATS", "LossRise", "loss_rise", "overshoot_advice", "report_loss_rise"]

#: The default threshold: a rise of the global eval loss, in nats per token, between two evaluated rounds.
DEFAULT_LOSS_RISE_NATS = 0.1
#: What a warning says when the rule has no setting of its own to blame.
README_ADVICE = "see the server-optimizer section of the README for safeguards"


@dataclass(frozen=True)
class LossRise:
    """The global eval loss of ``round_idx`` is ``rise`` above that of ``previous_round``."""

    round_idx: int
    previous_round: int
    previous_loss: float
    loss: float
    threshold: float
    advice: str = README_ADVICE

    @property
    def rise(self) -> float:
        return self.loss - self.previous_loss

    @property
    def message(self) -> str:
        return (
            f"global eval loss rose {self.rise:.3f} nats in round {self.round_idx} "
            f"({self.previous_loss:.4f} after round {self.previous_round} -> {self.loss:.4f}; "
            f"warning above {self.threshold:g}): the server rule may overshoot; {self.advice}"
        )


def overshoot_advice(rule: str, params: object) -> str:
    """What to try when ``rule`` overshoots, from its parameters, as the config spells the key.

    Measured on the Dolly bench (``bench/README.md``): DiLoCo's outer momentum 0.9 rose 0.3–1.5 nats
    in runs of 4–8 rounds and 0.5 never rose; a server learning rate above 1 amplifies each round.
    """
    key = "train_args.server_optimizer_args"
    momentum = getattr(params, "server_momentum", None)
    lr = getattr(params, "server_learning_rate", None)
    if isinstance(momentum, float) and momentum > 0.5:
        return (
            f"{rule}'s outer momentum {momentum:g} builds up over ~10 rounds and overshoots in short runs: "
            f"try {key}.server_momentum=0.5"
        )
    if isinstance(lr, float) and lr > 1.0:
        return f"{rule}'s server learning rate {lr:g} amplifies every round's move: try {key}.server_learning_rate=1.0"
    return README_ADVICE


def loss_rise(
    losses: Sequence[tuple[int, float | None]], *, threshold: float | None, advice: str = README_ADVICE
) -> LossRise | None:
    """The rise of the last entry's loss over the previous evaluated round's, when above ``threshold``.

    ``losses`` is (round index, global eval loss or None when that round was not evaluated) in
    round order. Only the last entry is judged, so calling this after every round reports each
    rise once. A loss that turns non-finite after a finite one counts as a rise of infinity.
    ``threshold`` None turns the check off; ``advice`` (:func:`overshoot_advice`) ends the message.
    """
    if threshold is None or not losses:
        return None
    round_idx, loss = losses[-1]
    if loss is None:
        return None
    previous = next(((r, v) for r, v in reversed(losses[:-1]) if v is not None and math.isfinite(v)), None)
    if previous is None:
        return None
    rise = loss - previous[1] if math.isfinite(loss) else math.inf
    if not rise > threshold:
        return None
    return LossRise(round_idx, previous[0], previous[1], loss, threshold, advice)


def report_loss_rise(
    metrics: MetricsLog,
    rounds: Iterable[RoundSummary],
    *,
    threshold: float | None,
    rank: int = 0,
    advice: str = README_ADVICE,
) -> LossRise | None:
    """Check the last of ``rounds`` and, on a sharp rise, log a ``warning`` event (``kind: loss_rise``)."""
    found = loss_rise([(s.round_idx, s.eval_loss) for s in rounds], threshold=threshold, advice=advice)
    if found is not None:
        metrics.log(
            "warning",
            round_idx=found.round_idx,
            rank=rank,
            kind="loss_rise",
            message=found.message,
            previous_round=found.previous_round,
            previous_loss=found.previous_loss,
            loss=found.loss if math.isfinite(found.loss) else None,
            threshold=found.threshold,
        )
    return found
