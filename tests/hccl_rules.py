"""Runs a repository script under HCCL's collective rules, recording what each rank issues.

    python -m torch.distributed.run --nproc_per_node 2 tests/hccl_rules.py OUT script.py [args...]

Every torch.distributed collective is wrapped: a tensor of a dtype HCCL cannot carry raises
TypeError (reductions: int8, int32, int64, float16, float32, the Ascend 910's all-reduce
dtypes, which the 910B's extend with bfloat16; other collectives also uint8, int16, bfloat16;
never float64, bool, complex), and each outermost call is
recorded as 'name dtypes shape' in OUT/rank<R>.json, so a test can check that all ranks issue the
same sequence. (DDP's gradient buckets are all-reduced from C++, over the parameters' dtype.)
"""
import functools
import json
import os
import runpy
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

REDUCIBLE = {torch.int8, torch.int32, torch.int64, torch.float16, torch.float32}
MOVABLE = REDUCIBLE | {torch.uint8, torch.int16, torch.bfloat16}
REDUCING = {'all_reduce', 'reduce', 'reduce_scatter', 'reduce_scatter_tensor', 'all_reduce_coalesced'}
COLLECTIVES = sorted(REDUCING | {
    'all_gather', 'all_gather_into_tensor', 'all_gather_object', 'broadcast', 'broadcast_object_list',
    'gather', 'gather_object', 'scatter', 'scatter_object_list', 'all_to_all', 'all_to_all_single',
    'barrier', 'monitored_barrier'})

calls, _depth = [], threading.local()


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _wrap(name, fn):
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        tensors = list(_tensors([*args, *kwargs.values()]))
        allowed = REDUCIBLE if name in REDUCING else MOVABLE
        bad = sorted({str(t.dtype) for t in tensors if t.dtype not in allowed})
        if bad:
            raise TypeError(f'dist.{name} with {", ".join(bad)}: HCCL does not carry this dtype here')
        depth = getattr(_depth, 'n', 0)
        if depth == 0:
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            dtypes = ','.join(sorted({str(t.dtype) for t in tensors}))
            calls.append(f'{name} {dtypes} {list(first.shape) if first is not None else ""}'.strip())
        _depth.n = depth + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth.n = depth
    return checked


def main():
    out, script, *args = sys.argv[1:]
    for name in COLLECTIVES:
        if hasattr(c10d, name):
            wrapped = _wrap(name, getattr(c10d, name))
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)
    try:
        runpy.run_path(script, run_name='__main__')
    finally:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f'rank{os.environ.get("RANK", "0")}.json').write_text(json.dumps(calls))


if __name__ == '__main__':
    main()
