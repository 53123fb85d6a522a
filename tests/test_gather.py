"""gather_with_grad in 2 gloo processes against torch.distributed.nn's all_gather: values and
gradients, and a backward made of all-reduces only (no all_to_all: hcclAlltoAllV on Ascend)."""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

import losses
from helpers import run_distributed

WORLD, B, D = 2, 3, 5


def _inputs(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(B, D, generator=g), torch.randn(WORLD * B, D, generator=g)


def _loss(gathered, rank, weight):
    """A different non-linear function of the gathered rows on each rank."""
    return ((gathered * weight).sum(dim=1) ** 2).sum() * (rank + 1) + gathered[rank].exp().sum()


def _worker(rank, world, path):
    issued = []
    for name in ('all_gather', 'all_reduce', 'all_to_all', 'all_to_all_single', 'reduce_scatter', 'scatter'):
        fn = getattr(dist, name)
        setattr(dist, name, lambda *a, _fn=fn, _name=name, **k: issued.append(_name) or _fn(*a, **k))
    x, weight = _inputs(rank)
    out = {}
    for key, gather in (('ours', losses.gather_with_grad),
                        ('torch', lambda t: torch.cat(dist_fn.all_gather(t), dim=0))):
        leaf = x.clone().requires_grad_()
        gathered = gather(leaf)
        start = len(issued)
        _loss(gathered, rank, weight).backward()
        out[key] = {'value': gathered.detach(), 'grad': leaf.grad, 'backward': issued[start:]}
    torch.save(out, f'{path}.{rank}')


def test_gather_with_grad_equals_torch_distributed_nn(tmp_path):
    run_distributed(_worker, WORLD, str(tmp_path / 'out'))
    got = [torch.load(tmp_path / f'out.{r}', weights_only=True) for r in range(WORLD)]
    rows = torch.cat([_inputs(r)[0] for r in range(WORLD)])
    for r in range(WORLD):
        assert torch.equal(got[r]['ours']['value'], rows) and torch.equal(got[r]['torch']['value'], rows)
        torch.testing.assert_close(got[r]['ours']['grad'], got[r]['torch']['grad'], rtol=1e-6, atol=1e-6)
        assert got[r]['ours']['backward'] == ['all_reduce']
    # the gradient of rank r's rows is the sum over ranks of each rank's loss gradient at those rows
    full = rows.clone().requires_grad_()
    sum(_loss(full, r, _inputs(r)[1]) for r in range(WORLD)).backward()
    for r in range(WORLD):
        torch.testing.assert_close(got[r]['ours']['grad'], full.grad[r * B:(r + 1) * B], rtol=1e-6, atol=1e-6)
