"""Training the members of a grid as one batched model.

The points of a sweep that share a network's shape (its seeds, and axis values that
change no shape: learning rate, init scale, momentum) train together as ``K`` members
of one batched network: a Linear as one batched matmul, a conv as one grouped conv, a
norm layer over the members' channels side by side (:mod:`.layers`, :mod:`.norms`,
:mod:`.models`), stepped by one SGD whose settings are per member (:mod:`.optim`).
Each member keeps its own initial weights, batch order, random stream, optimizer state,
divergence, records and checkpoint (:mod:`.trainer`).
"""

from covshift.batched.layers import BatchedConv2d, BatchedLinear
from covshift.batched.models import StackedModel, stack_models
from covshift.batched.slots import NotBatchable, Slot

__all__ = [
    "BatchedConv2d",
    "BatchedLinear",
    "NotBatchable",
    "Slot",
    "StackedModel",
    "stack_models",
]
