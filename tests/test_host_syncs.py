"""No training step waits for the device. On CUDA `tools/bench.py step` checks it with the sync debug
mode; here, on CPU, every tensor that would live on the accelerator is marked (weights, buffers,
optimiser state, queues, counters, whatever images.to_device moves there, and every result of an op
on a marked tensor), and an op that reads such a tensor back to the host is an error: `.item()` and
friends, or a shape that depends on its values. Not seen: a tensor the step builds on the device from
sizes alone, until it meets a marked one."""
import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import images
from tiny_step import step, tiny_state

READS_BACK = {'aten._local_scalar_dense.default', 'aten.nonzero.default', 'aten.masked_select.default',
              'aten._unique2.default', 'aten.unique_dim.default', 'aten.unique_consecutive.default',
              'aten.repeat_interleave.Tensor', 'aten.is_nonzero.default', 'aten.equal.default'}


def _bool_index(func, args):
    return str(func).startswith('aten.index.') and any(
        isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_flatten(args[1:])[0])


class HostReads(TorchDispatchMode):
    """Marks what an op on a marked tensor returns; counts the ops that read a marked tensor back."""

    def __init__(self):
        super().__init__()
        self.found = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        marked = any(getattr(t, '_on_device', False) for t in tree_flatten((args, kwargs))[0])
        if marked and (str(func) in READS_BACK or _bool_index(func, args)):
            self.found[str(func), ''.join(traceback.format_stack(limit=6)[:-1])] += 1
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0] if marked else ():
            if isinstance(t, torch.Tensor):
                t._on_device = True
        return out


def _mark(tensors):
    for t in tensors:
        if t is not None:
            t._on_device = True


def host_reads(monkeypatch, accum_steps=1, static=False, fused=True):
    """The marked reads of the second step of the tiny DeCLIP (the first builds the optimiser state)."""
    cfg, state, batch = tiny_state(batch=8, accum_steps=accum_steps)
    state.static_shapes = static
    step(state, batch, cfg)
    state.optimizer.defaults['fused'] = fused
    _mark([*state.model.parameters(), *state.model.buffers(), state.queue, state.nonfinite_run,
           state.nonfinite_total, *(v for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v))])

    def to_device(t, device):   # the device's own copy (on CPU .to() would return the host tensor)
        out = t.clone()
        out._on_device = True
        return out
    monkeypatch.setattr(images, 'to_device', to_device)
    with HostReads() as mode:
        step(state, batch, cfg)
    return mode.found


@pytest.mark.parametrize('accum_steps, static', [(1, False), (2, False), (1, True)],
                         ids=['one_pass', 'accumulated', 'static_shapes'])
def test_a_step_reads_nothing_back_from_the_device(monkeypatch, accum_steps, static):
    assert host_reads(monkeypatch, accum_steps, static) == {}


def test_the_check_sees_a_read_back(monkeypatch):
    """An AdamW without torch's fused kernel decides the non-finite skip on the host (skip.item())."""
    found = host_reads(monkeypatch, fused=False)
    assert [name for name, _ in found] == ['aten._local_scalar_dense.default']
    assert 'optimizer_step' in next(iter(found))[1]
