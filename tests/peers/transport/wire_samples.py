"""Hidden states and step requests that the compressed wire's tests encode (test_wire.py and
test_wire_hostile.py): a route of two hops, states with blocks of every size and an outlier."""

import torch

from peers.transport.frames import Hop, Sampling, StepRequest
from peers.transport.wire import LOSSLESS, decode_hidden, encode_hidden

HOPS = [Hop("a" * 43, "127.0.0.1:7001", 10, 20), Hop("b" * 43, "127.0.0.1:7002", 20, 30)]


def hidden(
    shape: tuple[int, ...] = (2, 5, 100), seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[-1])  # blocks of every size
    x[0, 1, 3] = 900.0  # an outlier, as real hidden states have
    return x.to(dtype)


def step(tensor: torch.Tensor, wire: str = LOSSLESS) -> StepRequest:
    return StepRequest("s" * 32, 7, HOPS, Sampling(), tensor, wire=wire)


def round_trip(tensor: torch.Tensor, encoding: str) -> torch.Tensor:
    fields, payload = encode_hidden(tensor, encoding)
    return decode_hidden(fields, tensor.dtype, list(tensor.shape), payload)
