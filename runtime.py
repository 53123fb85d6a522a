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
    'auto', else the one `requested` (config.device), which must then be there."""
    if requested not in DEVICES:
        raise ValueError(f'config.device: one of {", ".join(DEVICES)}, got {requested!r}')
    npu = import_torch_npu()
    check_versions(torch.__version__, getattr(npu, '__version__', None))
    available = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else 'cpu'
    device_type = available if requested == 'auto' else requested
    if device_type == 'cpu':
        return torch.device('cpu'), 'cpu'
    if device_type != available:
        raise RuntimeError(f'config.device={requested!r}, but this process sees {available!r} '
                           f'(set --config.device=auto or cpu)')
    torch.accelerator.set_device_index(local_rank)
    return torch.device(device_type, local_rank), device_type


SETTINGS = ('auto', 'true', 'false')


def _kernel_family(device_name):
    """CANN's kernel folder name of an Ascend chip: Ascend910B3 -> ascend910b,
    Ascend910_9391 -> ascend910_93, Ascend910A / Ascend910ProB -> ascend910."""
    name = device_name.lower()
    for family in ('ascend910_93', 'ascend910b'):
        if name.startswith(family):
            return family
    return 'ascend910' if name.startswith('ascend910') else name


def shape_modes(device_type, *, jit_compile='auto', static_shapes='auto', device_name='', kernel_dirs=()):
    """(jit_compile or None off NPU, static_shapes) for config.npu_jit_compile / static_shapes.

    Online operator compilation (jit) compiles each operator once per new input shape: shapes
    that change every step (colour-op sample counts, the number of masked tokens) then compile
    every step. CANN's binary kernels handle any shape without compiling, so 'auto' turns jit off
    where the kernels package of this chip is installed (`kernel_dirs`: the folders of
    opp/built-in/op_impl/ai_core/tbe/kernel), and makes shapes static only where jit stays on
    (the first-generation 910 without it). Off NPU, 'auto' means dynamic shapes."""
    for key, value in (('npu_jit_compile', jit_compile), ('static_shapes', static_shapes)):
        if str(value).lower() not in SETTINGS:
            raise ValueError(f'config.{key}: auto, true or false, got {value!r}')
    jit_compile, static_shapes = str(jit_compile).lower(), str(static_shapes).lower()
    if device_type != 'npu':
        return None, static_shapes == 'true'
    jit = jit_compile == 'true' if jit_compile != 'auto' else _kernel_family(device_name) not in kernel_dirs
    return jit, static_shapes == 'true' if static_shapes != 'auto' else jit


def npu_kernel_dirs():
    opp = os.environ.get('ASCEND_OPP_PATH', '')
    kernels = Path(opp) / 'built-in' / 'op_impl' / 'ai_core' / 'tbe' / 'kernel'
    return {p.name for p in kernels.iterdir() if p.is_dir()} if opp and kernels.is_dir() else set()


def configure_shapes(device_type, *, jit_compile='auto', static_shapes='auto'):
    """shape_modes on this machine; on NPU also sets torch_npu's operator compile mode."""
    if device_type != 'npu':
        return shape_modes(device_type, jit_compile=jit_compile, static_shapes=static_shapes)
    jit, static = shape_modes('npu', jit_compile=jit_compile, static_shapes=static_shapes,
                              device_name=torch.npu.get_device_name(), kernel_dirs=npu_kernel_dirs())
    torch.npu.set_compile_mode(jit_compile=jit)
    return jit, static


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
