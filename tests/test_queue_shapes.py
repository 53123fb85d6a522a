"""The NN queue push: FIFO semantics against a row-by-row reference, and shapes that never depend
on the pointer (static shapes for Ascend's operator compile)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import losses


def reference_push(queue, ptr, feats, skip):
    """Row by row: feature j goes to row ptr + j while that is inside the queue (the rest is
    dropped), nothing is written when skipped; the pointer restarts at 0 once the end is reached."""
    out = queue.clone()
    for j in range(feats.shape[0]):
        if ptr + j < queue.shape[0] and not skip:
            out[ptr + j] = feats[j]
    return out, (0 if ptr + feats.shape[0] >= queue.shape[0] else ptr + feats.shape[0])


@pytest.mark.parametrize('size, n', [(10, 4), (8, 4), (5, 5), (4, 7), (1, 1), (6, 1)])
def test_push_equals_the_row_by_row_fifo(size, n):
    queue = torch.arange(size * 3, dtype=torch.float32).reshape(size, 3)
    feats = -1 - torch.arange(n * 3, dtype=torch.float64).reshape(n, 3)   # cast to the queue's dtype
    for ptr in range(size):
        for skip in (None, torch.tensor(0.0), torch.tensor(1.0)):
            got, got_ptr = losses.nn_queue_push(queue=queue, ptr=ptr, feats=feats, skip=skip)
            want, want_ptr = reference_push(queue, ptr, feats.float(), skip is not None and skip.item() > 0)
            assert got_ptr == want_ptr and got.dtype == queue.dtype and torch.equal(got, want), (ptr, skip)
    assert torch.equal(queue, torch.arange(size * 3, dtype=torch.float32).reshape(size, 3))


class Shapes(TorchDispatchMode):
    """Every operator's name and the shapes of its inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def shapes(values):
            return [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), shapes(args), shapes(kwargs.values() if kwargs else []), shapes(outs)))
        return out


@pytest.mark.parametrize('n', [3, 12])
def test_no_shape_depends_on_the_pointer(n):
    """The same operators on the same shapes for every pointer: inside, wrapping, reaching the end."""
    queue, feats, skip = torch.randn(10, 4), torch.randn(n, 4), torch.tensor(0.0)
    traces = []
    for ptr in range(10):
        with Shapes() as mode:
            losses.nn_queue_push(queue=queue, ptr=ptr, feats=feats, skip=skip)
        traces.append(mode.ops)
    assert traces[0] and all(t == traces[0] for t in traces), [len(t) for t in traces]
