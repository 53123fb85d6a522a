"""Runtime: devices, process groups, precision, the AdamW kind and its state layout, NPU shape modes and
memory statistics.

`train.py`, `evaluate.py` and `tools/bench.py` share these; nothing here knows about models or data.
"""
import contextlib
import datetime
import os
import resource

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------
# Devices, processes, precision
# ----------------------------------------------------------------------------------------------

def dist_env():
    """(rank, world size, local rank) from torchrun's environment, else from SLURM's (srun: one
    task per device; MASTER_ADDR / MASTER_PORT must then be set), else a single process."""
    env = os.environ
    if 'RANK' not in env and 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', 1)) > 1:
        return int(env['SLURM_PROCID']), int(env['SLURM_NTASKS']), int(env.get('SLURM_LOCALID', 0))
    return int(env.get('RANK', 0)), int(env.get('WORLD_SIZE', 1)), int(env.get('LOCAL_RANK', 0))


DEVICES = ('auto', 'npu', 'cuda', 'cpu')


def import_torch_npu():
    """The torch_npu module (which registers the 'npu' device) when installed, else None. Only its absence is normal: an
    installed torch_npu that fails to import (CANN libraries not on the library path, a version
    that does not match torch) is an error, never a silent fall-back to the CPU."""
    try:
        import torch_npu
        return torch_npu
    except ModuleNotFoundError as e:
        if e.name != 'torch_npu':
            raise RuntimeError(f'torch_npu is installed but cannot be imported: {e}') from e
        return None
    except (ImportError, OSError) as e:
        raise RuntimeError(f'torch_npu is installed but cannot be imported ({e}); source CANN\'s '
                           f'set_env.sh (test/env_npu.sh) or uninstall torch_npu') from e


TORCH_FLOOR = (2, 6)  # torch.accelerator, torch.nn.utils.get_total_norm


def _major_minor(version):
    return tuple(int(part) for part in version.split('+')[0].split('.')[:2])


def check_versions(torch_version, npu_version=None):
    """Refuse a torch older than the floor, and a torch_npu whose major.minor differs from torch's
    (torch_npu is built for one torch release; a mismatch fails later in obscure ways)."""
    if _major_minor(torch_version) < TORCH_FLOOR:
        raise RuntimeError(f'torch {torch_version} is too old: this code needs torch >= '
                           f'{".".join(map(str, TORCH_FLOOR))}')
    if npu_version is not None and _major_minor(npu_version) != _major_minor(torch_version):
        raise RuntimeError(f'torch_npu {npu_version} does not match torch {torch_version}: install the '
                           f'torch_npu release of the same major.minor (e.g. torch 2.6.0 with torch_npu 2.6.0)')


def setup_device(local_rank, requested='auto'):
    """(device, device type): the accelerator torch sees (Ascend NPU with torch_npu, CUDA, ...) for
    'auto', else the one `requested` (config.runtime.device), which must then be there."""
    if requested not in DEVICES:
        raise ValueError(f'config.runtime.device: one of {", ".join(DEVICES)}, got {requested!r}')
    npu = import_torch_npu()
    check_versions(torch.__version__, getattr(npu, '__version__', None))
    available = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else 'cpu'
    device_type = available if requested == 'auto' else requested
    if device_type == 'cpu':
        return torch.device('cpu'), 'cpu'
    if device_type != available:
        raise RuntimeError(f'config.runtime.device={requested!r}, but this process sees {available!r} '
                           f'(set --config.runtime.device=auto or cpu)')
    torch.accelerator.set_device_index(local_rank)
    if device_type == 'npu':
        npu_settings()
    return torch.device(device_type, local_rank), device_type


def npu_settings():
    """torch_npu settings made before any model exists. Plain (ND) layouts: otherwise .to('npu')
    stores BatchNorm parameters as NC1HWC0 and conv weights as FRACTAL_Z, which
    GlobalBatchNorm2d's views and lerps and patch_embed's reshape of conv1.weight do not expect.
    fp32 matmuls and convolutions without HF32 (on by default for the 910B's convolutions), so that
    fp32, evaluation's default, means fp32."""
    torch.npu.config.allow_internal_format = False
    torch.npu.matmul.allow_hf32 = False
    torch.npu.conv.allow_hf32 = False


SETTINGS = ('auto', 'true', 'false')


def shape_modes(device_type, *, jit_compile='auto', static_shapes='auto', jit_default=True):
    """(jit_compile or None off NPU, static_shapes) for config.runtime.npu_jit_compile / static_shapes.

    Online operator compilation (jit) compiles each operator once per new input shape: shapes
    that change every step (colour-op sample counts, the number of masked tokens) then compile
    every step, so static shapes follow jit. 'auto' keeps torch_npu's own compile mode
    (`jit_default`: its default for the chip and CANN release, read from torch_npu) rather than
    guessing it. Off NPU, 'auto' means dynamic shapes."""
    for key, value in (('runtime.npu_jit_compile', jit_compile), ('runtime.static_shapes', static_shapes)):
        if str(value).lower() not in SETTINGS:
            raise ValueError(f'config.{key}: auto, true or false, got {value!r}')
    jit_compile, static_shapes = str(jit_compile).lower(), str(static_shapes).lower()
    if device_type != 'npu':
        return None, static_shapes == 'true'
    jit = jit_default if jit_compile == 'auto' else jit_compile == 'true'
    return jit, jit if static_shapes == 'auto' else static_shapes == 'true'


def configure_shapes(device_type, *, jit_compile='auto', static_shapes='auto'):
    """shape_modes on this machine; on NPU, torch_npu's compile mode is read (jit_compile='auto')
    or set."""
    if device_type != 'npu':
        return shape_modes(device_type, jit_compile=jit_compile, static_shapes=static_shapes)
    jit, static = shape_modes('npu', jit_compile=jit_compile, static_shapes=static_shapes,
                              jit_default=not torch.npu.is_jit_compile_false())
    if str(jit_compile).lower() != 'auto':
        torch.npu.set_compile_mode(jit_compile=jit)
    return jit, static


def init_distributed(device_type, rank, world, timeout_s):
    missing = [k for k in ('MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
    if missing:
        raise RuntimeError(f'{world} processes but {" and ".join(missing)} not set (torchrun sets them; under '
                           f'SLURM export them, e.g. the first host of $SLURM_JOB_NODELIST and a free port)')
    backend = {'cuda': 'nccl', 'npu': 'hccl'}.get(device_type, 'gloo')
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def finish_distributed():
    """Every process ends with barrier + destroy (gloo processes may abort at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def processes(device_type, timeout_s):
    """(rank, world) inside a process group when torchrun started several processes."""
    rank, world, _ = dist_env()
    if world > 1:
        init_distributed(device_type, rank, world, timeout_s)
    try:
        yield rank, world
    finally:
        finish_distributed()


def all_reduce_sum(counts, device):
    """Counts summed over ranks (through `device`: the backend's tensors), back on the host."""
    counts = counts.to(device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return counts.cpu()


def rows_to_first(rows, world):
    """Every rank's rows (a [k, ...] tensor, the same shape on every rank) on rank 0 as host
    tensors in rank order, [] elsewhere. One row at a time, broadcast from each rank in turn:
    HCCL has no gather (torch_npu's stands in an all_gather that holds world x k rows on every
    device at once: 4 GiB of NN queues at 8 cards x accum 4), and broadcast needs no extra
    point-to-point communicators; a device holds one extra row at most."""
    rank = dist.get_rank() if world > 1 else 0
    buffer = torch.empty_like(rows[0]) if world > 1 else None
    # copies, on CPU too: the buffer is reused and the rows change in the next step
    out = [row.to('cpu', copy=True) for row in rows] if rank == 0 else []
    for src in range(1, world):
        for row in rows:
            one = row if rank == src else buffer
            dist.broadcast(one, src=src)
            if rank == 0:
                out.append(one.to('cpu', copy=True))
    return out


PRECISIONS = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def choose_precision(name, device_type, bf16_supported):
    """The precision `name` means on a device: 'auto' is fp32 on CPU, bf16 where the accelerator
    has it, else fp16 with a loss scaler (Ascend 910). An explicit bf16 on an accelerator without
    it is refused: its autocast would turn itself off and run fp32 without a loss scaler."""
    if name == 'auto':
        name = 'fp32' if device_type == 'cpu' else 'bf16' if bf16_supported else 'fp16'
    if name not in PRECISIONS:
        raise ValueError(f'precision must be auto, bf16, fp16 or fp32, got {name!r}')
    if name == 'bf16' and device_type != 'cpu' and not bf16_supported:
        raise ValueError(f'this {device_type} has no bf16 (e.g. Ascend 910): use fp16, fp32 or auto')
    return name


def check_precisions(device_type, settings):
    """Refuse, before any work, a precision the device cannot run; `settings` maps each setting's
    name as the user writes it (config key, flag) to its value, and the error names it."""
    supported = bf16_supported(device_type)
    for key, name in settings.items():
        try:
            choose_precision(name, device_type, supported)
        except ValueError as e:
            raise ValueError(f'{key}={name}: {e}') from None


def bf16_supported(device_type):
    module = torch.get_device_module(device_type) if device_type != 'cpu' else None
    return bool(getattr(module, 'is_bf16_supported', lambda: False)())


def precision(name, device_type):
    """(dtype, autocast context, use a loss scaler) of config.runtime.precision on this device."""
    dtype = PRECISIONS[choose_precision(name, device_type, bf16_supported(device_type))]
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    return dtype, ctx, dtype == torch.float16


def grad_scaler(device_type, enabled):
    """The loss scaler: torch_npu's on NPU (it clears the 910's overflow flag and agrees on
    overflow across ranks), torch's elsewhere; a no-op unless `enabled` (fp16)."""
    if device_type == 'npu' and enabled:
        return torch.npu.amp.GradScaler()
    return torch.amp.GradScaler(device_type, enabled=enabled)


# ----------------------------------------------------------------------------------------------
# AdamW: torch's, or torch_npu's fused one on a 910 with fp16; checkpoints in torch's layout
# ----------------------------------------------------------------------------------------------

ADAMW_HYPER = ('lr', 'betas', 'eps', 'weight_decay', 'amsgrad')  # what a checkpoint's groups carry over


def npu_fused_adamw_wanted(device_type, use_scaler, foreach_devices):
    """Whether AdamW is torch_npu's fused one: on an NPU where torch's would loop over the
    parameters one at a time (torch_npu lets torch's optimisers use foreach kernels only on a 910B
    or later; `foreach_devices` is torch's list as torch_npu patches it), and with fp16, whose loss
    scaler decides the skip on the host (the fused step takes no found_inf)."""
    return device_type == 'npu' and use_scaler and device_type not in foreach_devices


def npu_fused_adamw(device_type, use_scaler):
    """torch_npu's NpuFusedAdamW class where npu_fused_adamw_wanted says so, else None."""
    if device_type != 'npu':   # torch_npu's foreach list (set for the chip) asks the NPU its name
        return None
    from torch.optim import optimizer
    foreach = optimizer._get_foreach_kernels_supported_devices()
    if not npu_fused_adamw_wanted(device_type, use_scaler, foreach):
        return None
    from torch_npu.optim import NpuFusedAdamW
    return NpuFusedAdamW


def is_npu_fused(optimizer):
    """torch_npu's fused optimisers carry this flag (its GradScaler looks for it too)."""
    return getattr(optimizer, 'is_fused_optimizer', False)


def portable_adamw(optimizer):
    """`optimizer` whose state dict is in torch.optim.AdamW's layout on every device, so that a
    checkpoint moves between CPU, GPU and NPU runs: torch_npu's fused AdamW converts on save, every
    AdamW converts on load (adamw_state_for)."""
    if is_npu_fused(optimizer):
        optimizer.register_state_dict_post_hook(lambda _, state_dict: torch_adamw_state(state_dict))
    optimizer.register_load_state_dict_pre_hook(adamw_state_for)
    return optimizer


def torch_adamw_state(state_dict):
    """torch_npu's fused AdamW state dict in torch.optim.AdamW's layout: each step count a float32
    tensor (an int there), the moments as host copies (views into its combined buffer there),
    torch's group keys (it keeps the hyper-parameters only; torch's defaults for the rest)."""
    defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
    groups = [{**defaults, **{k: g[k] for k in ADAMW_HYPER}, 'params': g['params']}
              for g in state_dict['param_groups']]
    state = {i: {k: torch.tensor(float(v), dtype=torch.float32) if k == 'step' else v.detach().to('cpu', copy=True)
                 for k, v in one.items()} for i, one in state_dict['state'].items()}
    return {'state': state, 'param_groups': groups}


def adamw_state_for(optimizer, state_dict):
    """A saved AdamW state dict (torch's layout, from any device) as `optimizer` keeps it: the
    saved moments and hyper-parameters, this optimiser's own implementation keys (fused, foreach,
    ...: chosen for this device, not carried over) and its kind of step count (torch_npu's fused
    AdamW: an int; torch's: a float32 tensor)."""
    fused = is_npu_fused(optimizer)
    if fused and optimizer.is_states_combined:
        raise RuntimeError('torch_npu fused AdamW: load its state before its first step (it then steps '
                           'combined copies of the moments, which a later load does not reach)')
    saved = state_dict['param_groups']
    if len(saved) != len(optimizer.param_groups):
        return None   # torch.optim's own error follows
    groups = [{**{k: v for k, v in own.items() if k != 'params'}, **{k: g[k] for k in ADAMW_HYPER if k in g},
               'params': g['params']} for own, g in zip(optimizer.param_groups, saved)]
    state = {i: {k: (int(v) if fused else torch.as_tensor(v, dtype=torch.float32)) if k == 'step' else v
                 for k, v in one.items()} for i, one in state_dict['state'].items()}
    return {**state_dict, 'state': state, 'param_groups': groups}


def clear_grads(optimizer):
    """Gradients cleared for the next step: freed for torch's optimisers, zeroed in place for
    torch_npu's fused ones, whose .grad are views into the combined buffer they step (their
    zero_grad refuses set_to_none)."""
    optimizer.zero_grad(set_to_none=not is_npu_fused(optimizer))


def synchronize(device):
    """Wait for the accelerator's queued work (nothing to wait for on CPU)."""
    if device.type != 'cpu':
        torch.accelerator.synchronize()


@contextlib.contextmanager
def flop_counter():
    """torch's FLOP counter over eager code: a compiled function called under the counter is never
    used again (torch drops to eager for the rest of the process), so compiled code is bypassed
    while counting."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.compiler.set_stance('force_eager'), FlopCounterMode(display=False) as counter:
        yield counter


def empty_cache(device_type):
    """The caching allocator's free blocks handed back, so that memory figures start from what is live."""
    if device_type != 'cpu':
        torch.get_device_module(device_type).empty_cache()


def reset_peak_memory(device_type):
    if device_type != 'cpu':
        torch.get_device_module(device_type).reset_peak_memory_stats()


def peak_memory_gib(device_type):
    """Peak allocated device memory (the process's peak resident set on CPU), GiB."""
    if device_type == 'cpu':
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return torch.get_device_module(device_type).max_memory_allocated() / 2 ** 30
