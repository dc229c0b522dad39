"""What the OpenAI door needs of the peer it runs on, beyond what the entry needs: a small
interface that the composition root's node satisfies, so that the API never imports the node."""

from pathlib import Path
from typing import Any, Protocol

from inference import Tokenizer
from peers.entry.peer import EntryPeer


class ApiPeer(EntryPeer, Protocol):
    """The peer whose OpenAI door a request came through."""

    tokenizer: Tokenizer
    metrics: Any  # the peer's Prometheus metrics (peers/metrics.py): tokens and their timing
    active_requests: int
    served_model: str  # the name the API reports
    served_names: tuple[str, ...]  # the names it answers to
    model_path: Path  # its model's directory (generation_config.json: asks.model_sampling)

    def should_verify(self) -> bool: ...
