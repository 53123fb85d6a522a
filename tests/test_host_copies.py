"""Host-to-device copies are asynchronous only from pinned memory: on NPU a non_blocking copy of
unpinned memory waits for the device. images.to_device pins what is not pinned (tensors built in the
step: padded MLM positions, micro-batch rebasing) and copies the rest as they are; a tensor already
on the device (views decoded there) is left as it is."""
import torch

import images


class FakeTensor:
    """Records what to_device does with a host tensor on an accelerator."""

    def __init__(self, pinned, device='cpu'):
        self.pinned, self.calls, self.device = pinned, [], torch.device(device)

    def is_pinned(self):
        return self.pinned

    def pin_memory(self):
        self.calls.append('pin_memory')
        return FakeTensor(True)

    def to(self, device, non_blocking=False):
        self.calls.append(('to', device.type, non_blocking, self.pinned))
        return self


def test_unpinned_host_tensors_are_pinned_before_an_asynchronous_copy():
    """(Break caught: to_device copying unpinned memory with non_blocking, or pinning on CPU.)"""
    npu = torch.device('meta')   # any non-CPU device type
    pinned, unpinned = FakeTensor(True), FakeTensor(False)
    assert images.to_device(pinned, npu).calls == [('to', 'meta', True, True)]
    out = images.to_device(unpinned, npu)
    assert unpinned.calls == ['pin_memory'] and out.calls == [('to', 'meta', True, True)]
    there = FakeTensor(False, 'meta')      # already on the device: no pinning (a device tensor has none)
    assert images.to_device(there, npu).calls == [('to', 'meta', True, False)]
    cpu = FakeTensor(False)
    images.to_device(cpu, torch.device('cpu'))
    assert cpu.calls == [('to', 'cpu', True, False)]
    t = torch.arange(4)
    assert torch.equal(images.to_device(t, torch.device('cpu')), t)
