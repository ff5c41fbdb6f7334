"""A hook to watch the chunked engine work, chunk by chunk: for tests and profiling.

    events = []
    with observe_chunks(lambda event, details: events.append((event, details))):
        fused_linear_loss(hidden, head, labels, "lovasz").backward()

Events, with their details:

- ``"gather"``: a chunk gathered its scored hidden rows: ``rows`` (the row indices among
  the (B·T) positions) and ``buffer`` (the (rows, d) gathered copy of the first part).
- ``"gradient"``: a chunk's logit gradient was formed: ``dz`` (chunk, V) and ``rows``.
- ``"grads"``: the gradients handed to autograd: ``grads``, [db, dh_1, dW_1, ...].
- ``"kernel"``: an elementwise pass ran: ``name`` and ``compiled`` (True for torch.compile).

The tensors are the engine's own buffers, not copies: look, do not keep or edit them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Observer = Callable[[str, dict[str, Any]], None]
_observers: list[Observer] = []


@contextmanager
def observe_chunks(callback: Observer) -> Iterator[None]:
    """Call `callback(event, details)` for every engine event inside the block.

    Args:
        callback: takes the event's name and a dict of its details (module docstring).
    """
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


def observing() -> bool:
    """Whether anybody watches: the engine builds no event when nobody does."""
    return bool(_observers)


def notify(event: str, **details: Any) -> None:
    """Tell every observer about `event`."""
    for callback in list(_observers):
        callback(event, details)
