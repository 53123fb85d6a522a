"""Where a training step's memory goes. `bench.py memory`: the step's measured peak with
micro-batches or recomputation against without. `bench.py saved`: a step's peak is about the model
state (weights, gradients, AdamW's two moments) plus what autograd keeps from the forward for the
backward; this counts the latter by part of the model and dtype, on any device."""
import collections
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from absl import app

import accum
import trainstep


BENCH = Path(__file__).with_name('bench.py')


def bench_memory(args):
    """`step`'s peak memory and time per sample, plain / --accum micro-batches / gradient
    checkpointing (everything, or the image tower's first stage or block), each in its own process
    (peak RSS is per process), as ratios to plain."""
    variants = {'plain': 'accum_steps=1', f'accum_steps {args.accum}': f'accum_steps={args.accum}',
                'grad checkpointing': 'model.grad_checkpointing=True',
                'first image stage recomputed': 'model.checkpoint_image_stages=1'}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, override in variants.items():
            cmd = [sys.executable, str(BENCH), 'step', f'--config={args.config}', f'--set={override}',
                   f'--batch={args.batch}', f'--warmup={args.warmup}', f'--steps={args.steps}', f'--out={tmp}/s.json']
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            results[name] = json.loads((Path(tmp) / 's.json').read_text())
    mem, speed = results['plain']['peak_mem_gib'], results['plain']['img_per_s']
    rows = [(name, f'{r["peak_mem_gib"]:.3f} GiB', f'x{r["peak_mem_gib"] / mem:.2f} memory',
             f'{1000 / r["img_per_s"]:.2f} ms/sample', f'x{speed / r["img_per_s"]:.2f} time')
            for name, r in results.items()]
    return rows, {'config': args.config, 'batch': args.batch, 'variants': results}


@contextlib.contextmanager
def _module_stack(model):
    """A list that holds, while a forward runs, (top-level part, class) of the innermost module
    running ('objective', '-' outside the model's forward)."""
    stack, hooks = [('objective', '-')], []

    def leave(module, args, output):
        stack.pop()   # and the output unchanged (a hook's non-None return replaces it)
    for name, module in model.named_modules():
        key = (name.split('.')[0] or 'model', type(module).__name__)
        hooks += [module.register_forward_pre_hook(lambda m, a, key=key: stack.append(key)),
                  module.register_forward_hook(leave)]
    try:
        yield stack
    finally:
        for hook in hooks:
            hook.remove()


def saved_bytes(state, batch, cfg):
    """{(part, module class, dtype): bytes} autograd saves for backward in one training step (the
    loop's step, which then runs to its end), each storage counted once, where it is first saved;
    parameters not counted (they are model state), nor the input a recomputed block keeps (torch's
    checkpoint holds it outside autograd's saved tensors)."""
    seen = {p.untyped_storage().data_ptr() for p in state.model.parameters()}   # model state
    found = collections.Counter()

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            found[(*stack[-1], str(t.dtype).replace('torch.', ''))] += storage.nbytes()
        return t
    with _module_stack(state.model) as stack, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        accum.step_for(cfg)(state, batch, cfg)
    return found


def model_state_bytes(model):
    """Trained weights, their gradients and AdamW's two moments (in the weights' dtype, fp32 here:
    8 bytes); not the frozen weights nor the NN queue, which the linear fit's constant absorbs."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() * (2 * p.element_size() + 8) for p in params)


def bench_saved(args, *, cfg, device, batch):
    """The saved bytes of one eager step on `batch` (module hooks see inside eager code only) by
    part, class and dtype, largest first (those of at least 0.1 %), as MiB and shares of the total;
    then by part, and the model state beside them."""
    if cfg.accum_steps != 1:   # micro-batches are never alive together: their sum would be no peak
        raise app.UsageError('saved: one pass only (accum_steps=1)')
    cfg.runtime.compile = 'false'
    state = trainstep.build_state(cfg, device)
    found = saved_bytes(state, batch, cfg)
    total, mib = sum(found.values()), 2 ** 20
    rows = [(f'{part}, {cls}, {dtype}', f'{n / mib:.1f} MiB', f'{n / total:.1%}')
            for (part, cls, dtype), n in found.most_common() if n >= total / 1000]   # the rest in 'all' below
    by_part = collections.Counter()
    for (part, _, _), n in found.items():
        by_part[part] += n
    state_bytes = model_state_bytes(state.model)
    rows += [(f'{part}, all', f'{n / mib:.1f} MiB', f'{n / total:.1%}') for part, n in by_part.most_common()]
    rows += [('all saved', f'{total / mib:.1f} MiB', '100%'),
             ('model state (weights, gradients, AdamW moments)', f'{state_bytes / mib:.1f} MiB', '')]
    result = {'config': args.config, 'batch': args.batch, 'device': str(device), 'precision': args.precision,
              'saved_bytes': total, 'model_state_bytes': state_bytes,
              'parts': [{'part': p, 'module': c, 'dtype': d, 'bytes': n} for (p, c, d), n in found.most_common()]}
    return rows, result
