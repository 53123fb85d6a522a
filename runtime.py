"""Runtime: devices, process groups, precision, memory statistics and checkpoint files.

`train.py`, `evaluate.py` and `bench.py` share these; nothing here knows about models or data.
"""
import contextlib
import datetime
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------
# Devices, processes, precision
# ----------------------------------------------------------------------------------------------

def dist_env():
    """(rank, world size, local rank) from torchrun's environment; a single process without it."""
    env = os.environ
    return int(env.get('RANK', 0)), int(env.get('WORLD_SIZE', 1)), int(env.get('LOCAL_RANK', 0))


DEVICES = ('auto', 'npu', 'cuda', 'cpu')


def import_torch_npu():
    """Registers the 'npu' device when torch_npu is installed. Only its absence is normal: an
    installed torch_npu that fails to import (CANN libraries not on the library path, a version
    that does not match torch) is an error, never a silent fall-back to the CPU."""
    try:
        import torch_npu  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != 'torch_npu':
            raise RuntimeError(f'torch_npu is installed but cannot be imported: {e}') from e
    except (ImportError, OSError) as e:
        raise RuntimeError(f'torch_npu is installed but cannot be imported ({e}); source CANN\'s '
                           f'set_env.sh (test/env_npu.sh) or uninstall torch_npu') from e


def setup_device(local_rank, requested='auto'):
    """(device, device type): the accelerator torch sees (Ascend NPU with torch_npu, CUDA, ...) for
    'auto', else the one `requested` (config.device), which must then be there."""
    if requested not in DEVICES:
        raise ValueError(f'config.device: one of {", ".join(DEVICES)}, got {requested!r}')
    import_torch_npu()
    available = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else 'cpu'
    device_type = available if requested == 'auto' else requested
    if device_type == 'cpu':
        return torch.device('cpu'), 'cpu'
    if device_type != available:
        raise RuntimeError(f'config.device={requested!r}, but this process sees {available!r} '
                           f'(set --config.device=auto or cpu)')
    torch.accelerator.set_device_index(local_rank)
    return torch.device(device_type, local_rank), device_type


def init_distributed(device_type, rank, world, timeout_s):
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


PRECISIONS = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def choose_precision(name, device_type, bf16_supported):
    """The precision `name` means on a device: 'auto' is fp32 on CPU, bf16 where the accelerator
    has it, else fp16 with a loss scaler (Ascend 910, whose autocast would otherwise silently
    run bf16 as fp32)."""
    if name == 'auto':
        name = 'fp32' if device_type == 'cpu' else 'bf16' if bf16_supported else 'fp16'
    if name not in PRECISIONS:
        raise ValueError(f'precision must be auto, bf16, fp16 or fp32, got {name!r}')
    return name


def bf16_supported(device_type):
    module = torch.get_device_module(device_type) if device_type != 'cpu' else None
    return bool(getattr(module, 'is_bf16_supported', lambda: False)())


def precision(name, device_type):
    """(dtype, autocast context, use a loss scaler) of config.precision on this device."""
    dtype = PRECISIONS[choose_precision(name, device_type, bf16_supported(device_type))]
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    return dtype, ctx, dtype == torch.float16


def grad_scaler(device_type, enabled):
    """The loss scaler: torch_npu's on NPU (it clears the 910's overflow flag and agrees on
    overflow across ranks), torch's elsewhere; a no-op unless `enabled` (fp16)."""
    if device_type == 'npu' and enabled:
        return torch.npu.amp.GradScaler()
    return torch.amp.GradScaler(device_type, enabled=enabled)


def synchronize(device):
    """Wait for the accelerator's queued work (nothing to wait for on CPU)."""
    if device.type != 'cpu':
        torch.accelerator.synchronize()


def reset_peak_memory(device_type):
    if device_type != 'cpu':
        torch.get_device_module(device_type).reset_peak_memory_stats()


def peak_memory_gib(device_type):
    """Peak allocated device memory (the process's peak resident set on CPU), GiB."""
    if device_type == 'cpu':
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return torch.get_device_module(device_type).max_memory_allocated() / 2 ** 30


# ----------------------------------------------------------------------------------------------
# Checkpoint files: tensors and plain types only, atomic writes, newest readable copy
# ----------------------------------------------------------------------------------------------

class UnsafeCheckpoint(RuntimeError):
    pass


def safe_load(path):
    """torch.load with weights_only=True: a checkpoint that needs code execution is refused."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        if 'weights_only' in str(e) or 'Unsupported global' in str(e) or 'GLOBAL' in str(e):
            raise UnsafeCheckpoint(
                f'{path}: refused, the file needs arbitrary code execution to load (only tensors and '
                f'plain types are accepted): {str(e).splitlines()[0]}') from None
        raise RuntimeError(f'{path}: not a readable checkpoint ({type(e).__name__}: {e})') from e


def save_checkpoint(path, state):
    """Write to a temporary file, fsync, rename: a crash never leaves a partial `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fault_pause('DECLIP_TEST_PAUSE_BEFORE_RENAME')
    os.replace(tmp, path)


def _kept_copies(ckpt_dir):
    """step_<N>.pt files, oldest first."""
    return sorted(Path(ckpt_dir).glob('step_*.pt'), key=lambda p: int(p.stem[5:]))


def find_checkpoint(ckpt_dir, warn=print):
    """(path, state) of last.pt, else of the newest kept copy; unreadable files are skipped with a
    warning. (None, None) when there is none."""
    for path in [Path(ckpt_dir) / 'last.pt', *reversed(_kept_copies(ckpt_dir))]:
        if path.is_file():
            try:
                return path, safe_load(path)
            except Exception as e:  # noqa: BLE001 - try the next copy
                warn(f'skipping unreadable checkpoint {path}: {e}')
    return None, None


def prune_copies(ckpt_dir, keep):
    """Delete all but the newest `keep` kept copies (keep 0: delete none)."""
    if keep > 0:
        for old in _kept_copies(ckpt_dir)[:-keep]:
            old.unlink()


def fault_pause(var):
    """Fault-injection hook for the reliability tests (sleeps while the variable is set)."""
    if os.environ.get(var):
        time.sleep(float(os.environ[var]))
