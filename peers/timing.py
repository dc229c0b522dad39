"""Where a step's wall time goes on a peer (the hop path): reading the body, decoding the frame,
the checks before any work, the wait in the queue, the forward, and handing the output on
(encoding, sending, the next hop's acknowledgement) or sending the result to the entry."""

from dataclasses import dataclass, field

PHASES = ("read_body", "decode", "check", "queue", "compute", "hand_on")


@dataclass
class HopTimes:
    """Seconds and step counts of each phase, summed since the peer started."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def add(self, phase: str, seconds: float, count: int = 1) -> None:
        self.seconds[phase] += seconds
        self.counts[phase] += count

    def to_json(self) -> dict:
        """Mean milliseconds per step of each phase (a message's read and decode are shared by
        its frames, a forward by its batch)."""
        return {
            p: round(1000 * self.seconds[p] / self.counts[p], 3) if self.counts[p] else 0.0 for p in PHASES
        }
