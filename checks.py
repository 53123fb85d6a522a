"""Config checks of the shell, in one place: a config whose numbers, model, loss, batch, data or
evaluation set cannot train is refused at start, in one line naming the keys (or file) and the
rule, instead of failing deep inside the run."""

import codecs
import contextlib
import json
import math
import os
from pathlib import Path

import checkpoints
import declip
import evaluate
import guard
import images
import jpeg
import runtime
import shards
import text
import trainstep

VISIONS = ('vit', 'resnet')


class ConfigError(ValueError):
    """A config the run cannot use: the command line prints its message alone, not a traceback."""


@contextlib.contextmanager
def config_errors():
    """Whatever a check of the config raises (ValueError, a missing file) becomes a ConfigError."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from None


def _divides(errors, part, whole, part_key, whole_key):
    if part <= 0 or whole % part:
        errors.append(f'config.model.{whole_key} ({whole}) must be a multiple of config.model.{part_key} ({part})')


def _vision_errors(m):
    """What makes the image tower unbuildable: layers of the other tower type, heads that do not
    split the width, an image the patches or the ResNet's stride 32 do not tile."""
    errors = []
    if m.vision == 'vit':
        if not isinstance(m.vision_layers, int):
            errors.append(f"config.model.vision_layers: a ViT takes one block count, got {m.vision_layers!r} "
                          f"(a ResNet's four stage depths? then config.model.vision='resnet')")
        _divides(errors, m.patch_size, m.image_size, 'patch_size', 'image_size')
        _divides(errors, m.vision_heads, m.vision_width, 'vision_heads', 'vision_width')
    else:
        if isinstance(m.vision_layers, int) or len(tuple(m.vision_layers)) != 4:
            errors.append(f"config.model.vision_layers: a ResNet takes four stage depths, got {m.vision_layers!r} "
                          f"(a ViT's block count? then config.model.vision='vit')")
        if m.image_size % 32:
            errors.append(f'config.model.image_size ({m.image_size}) must be a multiple of 32 (the ResNet\'s stride)')
        if m.vision_heads <= 0 or (m.vision_width * 32) % m.vision_heads:
            errors.append(f'config.model.vision_width x 32 ({m.vision_width * 32}, the attention pool\'s width) must '
                          f'be a multiple of config.model.vision_heads ({m.vision_heads})')
    return errors


def check_model(cfg):
    """Refuse a config that cannot train: every error found, one line each (a ValueError)."""
    m, errors = cfg.model, []
    if m.vision not in VISIONS:
        raise ValueError(f'config.model.vision: one of {", ".join(VISIONS)}, got {m.vision!r}')
    errors += _vision_errors(m)
    _divides(errors, m.text_heads, m.text_width, 'text_heads', 'text_width')
    weights = {k: cfg.loss[k] for k in ('clip', 'simsiam', 'mlm', 'nn')}
    if not any(weights.values()):
        errors.append('config.loss: clip, simsiam, mlm and nn are all 0: nothing to train')
    extra = [k for k in ('simsiam', 'mlm', 'nn') if weights[k]]
    if extra and not m.declip:
        errors.append(f'config.loss.{"/".join(extra)} > 0 needs config.model.declip=True (the CLIP model has no '
                      f'SimSiam, MLM or NN parts)')
    if m.declip and cfg.data.batch_size < 2:
        errors.append(f'config.data.batch_size ({cfg.data.batch_size}): DeCLIP\'s SimSiam heads normalise over each '
                      f'device\'s batch (BatchNorm), which needs at least 2 samples')
    if errors:
        raise ValueError('\n'.join(errors))


# ----------------------------------------------------------------------------------------------
# The whole config: every check, before any work and before the workdir is created
# ----------------------------------------------------------------------------------------------

def check_values(tree, rules):
    """A config's leaves, after checking that every number (also inside lists) is finite and obeys
    the first rule (keys, ok, 'rule') whose keys (exact names, or prefixes ending in '.') match it."""
    values = checkpoints.leaves(tree)
    for key, value in values.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if not math.isfinite(v):
                    raise ValueError(f'config.{key}: must be a finite number, got {v}')
                keys, ok, rule = next((r for r in rules if checkpoints.matches(key, r[0])), ((), None, ''))
                if ok is not None and not ok(v):
                    raise ValueError(f'config.{key}: must be {rule}, got {value}')
    return values


POSITIVE = ('max_iter', 'accum_steps', 'log_every', 'ckpt_every', 'keep_every', 'eval_every', 'runtime.max_nonfinite',
            'runtime.dist_timeout_s', 'runtime.mlm_bucket', 'data.batch_size', 'data.prefetch', 'data.limits.bad_window',
            'data.limits.max_pixels', 'loss.queue_size', 'eval.batch_size', 'optim.eps')
NON_NEGATIVE = ('seed', 'stop_at', 'data.shuffle_buffer', 'keep_copies', 'runtime.tb_images', 'runtime.peak_tflops', 'data.workers', 'eval.workers',
                'data.limits.batch_timeout_s', 'model.checkpoint_image_stages',
                'optim.base_lr', 'optim.warmup_lr', 'optim.min_lr', 'optim.warmup_steps', 'optim.weight_decay',
                *(f'loss.{k}' for k in trainstep.LOSS_TERMS))
BELOW_ONE = ('optim.beta1', 'optim.beta2')
RATES = ('data.limits.max_bad_rate',)   # 1.0: never stop for bad samples


def check_numbers(cfg):
    """Every number finite; counts, rates and model sizes in range (a NaN learning rate would
    otherwise train NaN weights and a zero batch would fail only after the model is built)."""
    values = check_values(cfg.to_dict(), [
        (POSITIVE, lambda v: v > 0, '> 0'), (NON_NEGATIVE, lambda v: v >= 0, '>= 0'),
        (BELOW_ONE, lambda v: 0 <= v < 1, 'in [0, 1)'), (RATES, lambda v: 0 <= v <= 1, 'in [0, 1]'),
        (('model.',), lambda v: v > 0, '> 0')])   # model sizes: after NON_NEGATIVE's model key
    lo, hi = values['data.crop_scale']
    if not 0 < lo <= hi <= 1:
        raise ValueError(f'config.data.crop_scale: need 0 < min <= max <= 1, got {tuple(cfg.data.crop_scale)}')


def check_config(cfg):
    """Everything the run will need, before any work and before the workdir is created."""
    check_numbers(cfg)
    check_model(cfg)
    check_data(cfg.data)
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise ValueError(f'config.init_from: file not found: {cfg.init_from!r}')
    declip.activation(cfg.model.act)
    if cfg.data.val_meta:
        try:   # every line (naming file:line), and images under the folder
            evaluate.check_eval_set(cfg.data.val_root, cfg.data.val_meta)
        except ValueError as e:
            raise ValueError(f'config.data.val_meta / val_root: {e}') from None
        try:
            templates = text.load_prompts(cfg.eval.prompts)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f'config.eval.prompts: {e}') from None
        if not templates:
            raise ValueError(f'config.eval.prompts: {cfg.eval.prompts!r} has no templates')
    if cfg.accum_steps > 1 and cfg.data.format != 'jsonl':
        raise ValueError('config.accum_steps > 1 needs data.format=jsonl (shards go to ranks and loader workers, '
                         'not to the virtual devices of a larger job)')
    if cfg.accum_steps > 1 and cfg.model.sync_bn:
        raise ValueError(
            f'config.accum_steps={cfg.accum_steps} with config.model.sync_bn=True: BatchNorm cannot be synchronised '
            f'across micro-batches. Add --config.model.sync_bn=False (each micro-batch of data.batch_size='
            f'{cfg.data.batch_size} images then has its own BatchNorm statistics, as each device of the larger job '
            f'without synchronised BatchNorm: what the reference\'s public code ran), or use accum_steps=1')
    if cfg.model.declip and (cfg.data.views != 2 or not cfg.data.mask):
        raise ValueError('config.model.declip needs data.views=2 and data.mask=True')
    for key, name in (('runtime.precision', cfg.runtime.precision), ('eval.precision', cfg.eval.precision)):
        try:
            runtime.precision(name, 'cpu')
        except ValueError as e:
            raise ValueError(f'config.{key}: {e}') from None
    runtime.shape_modes('cpu', jit_compile=cfg.runtime.npu_jit_compile, static_shapes=cfg.runtime.static_shapes)
    trainstep.compile_scope(cfg.runtime.compile, 'cpu')


# ----------------------------------------------------------------------------------------------
# The data block: files and folders it names, format, augmentation, decode
# ----------------------------------------------------------------------------------------------


def _need(key, path, kind='file'):
    if not path or not (Path(path).is_file() if kind == 'file' else Path(path).is_dir()):
        raise ValueError(f'config.data.{key}: {kind} not found: {path!r}')


def check_device(cfg, device_type):
    """What the config asks of the device this process got: device JPEG decode only on CUDA (and
    CPU, for testing the path), bf16 only where the device has it."""
    if cfg.data.decode == 'device' and device_type not in ('cuda', 'cpu'):
        raise ValueError(f'config.data.decode=device needs CUDA (nvJPEG); on {device_type} torchvision would '
                         f'decode on the CPU inside the training process: use data.decode=host')
    runtime.check_precisions(device_type, {'config.runtime.precision': cfg.runtime.precision, 'config.eval.precision': cfg.eval.precision})


def check_data(cfg):
    """Every file and folder the data block names exists, the format, augmentation and decode are
    known, and a training meta file is not empty."""
    _need('bpe_path', cfg.bpe_path)
    if cfg.eda and cfg.eda_synonyms:
        _need('synonyms_path (or set --config.data.eda_synonyms=False)', cfg.synonyms_path)
    if cfg.format == 'jsonl':
        metas, roots = text.split_list(cfg.train_meta), text.split_list(cfg.train_root)
        if not metas:
            raise ValueError('config.data.train_meta: no meta file given')
        if len(roots) != len(metas):
            raise ValueError(f'config.data.train_root: {len(roots)} roots for {len(metas)} meta files')
        for meta, root in zip(metas, roots):
            _need('train_meta', meta)
            _need('train_root', root, 'folder')
            check_images(meta, root, check_meta(meta))
    elif cfg.format == 'wds':
        try:
            paths = shards.shard_paths(cfg.shards)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f'config.data.shards: {e}') from e
        problem = shards.probe_shard(next((p for p in paths if os.path.isdir(p)), paths[0]))
        if problem:
            raise ValueError(f'config.data.shards: {problem}')
        if not isinstance(cfg.shuffle_buffer, int) or cfg.shuffle_buffer < 0:
            raise ValueError(f'config.data.shuffle_buffer: a sample count >= 0, got {cfg.shuffle_buffer!r}')
    else:
        raise ValueError(f'config.data.format: "jsonl" or "wds", got {cfg.format!r}')
    if cfg.val_meta:
        _need('val_meta', cfg.val_meta)
        _need('val_root', cfg.val_root, 'folder')
    cfg.augmentation = images.augmentation_name(cfg.augmentation)
    if cfg.decode not in ('host', 'device'):
        raise ValueError(f'config.data.decode: "host" or "device", got {cfg.decode!r}')
    if cfg.decode == 'device':
        jpeg.nvjpeg_decoder('cpu')  # torchvision must be importable before any work starts


# ----------------------------------------------------------------------------------------------
# The corpus before any work: the first lines of each training meta file and their images
# ----------------------------------------------------------------------------------------------

PROBE_LINES, PROBE_BYTES = 20, 1 << 20
BOMS = ((codecs.BOM_UTF32_LE, 'UTF-32'), (codecs.BOM_UTF32_BE, 'UTF-32'), (codecs.BOM_UTF16_LE, 'UTF-16'),
        (codecs.BOM_UTF16_BE, 'UTF-16'))   # UTF-32 first: its little-endian mark starts with UTF-16's


def _meta_record(raw):
    """(record, None) of a meta line that can be a training sample, else (None, what is wrong)."""
    if b'\0' in raw:
        return None, 'NUL bytes: UTF-16 or UTF-32 text without a byte-order mark? JSON Lines is UTF-8'
    try:
        rec = json.loads(raw.decode('utf-8'))
    except UnicodeDecodeError as e:
        return None, f'not UTF-8 ({e.reason} at byte {e.start})'
    except ValueError as e:
        return None, f'not a JSON object on one line ({e})'
    if not isinstance(rec, dict) or not isinstance(rec.get('filename'), str) or 'caption' not in rec:
        found = f'keys {sorted(rec)}' if isinstance(rec, dict) else f'a JSON {type(rec).__name__}'
        return None, f'{found}, expected an object with "filename" (a string) and "caption"'
    return rec, None


def check_meta(meta):
    """[(line, record)] of the first lines of a training meta file that can be samples. The ways a
    corpus is commonly given wrong (UTF-16/32, one JSON array, other keys) fail every sample alike;
    refused here, before any work, naming file:line and what was expected. A few bad lines among
    good ones are the loader's to count."""
    with open(meta, 'rb') as f:
        head = f.read(PROBE_BYTES)
    where, cut = f'config.data.train_meta: {meta}', len(head) == PROBE_BYTES
    for bom, name in BOMS:
        if head.startswith(bom):
            raise ValueError(f'{where}:1: {name} text (it starts with a {name} byte-order mark); JSON Lines must be '
                             f'UTF-8: convert it, e.g. iconv -f {name} -t UTF-8')
    head = head.removeprefix(codecs.BOM_UTF8)
    if not head.strip():
        raise ValueError(f'{where} has no samples')
    if head.lstrip().startswith(b'['):
        line = head[:len(head) - len(head.lstrip())].count(b'\n') + 1
        raise ValueError(f'{where}:{line}: a JSON array, expected JSON Lines (one object a line: '
                         f'{{"filename": ..., "caption": ...}}): convert it, e.g. jq -c ".[]"')
    lines = head.split(b'\n')[:-1 if cut else None]   # a line the read cut is not judged
    lines = [(n, raw) for n, raw in enumerate(lines, 1) if raw.strip()][:PROBE_LINES]
    checked = [(n, *_meta_record(raw)) for n, raw in lines]
    records = [(n, rec) for n, rec, _ in checked if rec is not None]
    if checked and not records:
        span = 'its only line' if len(checked) == 1 else f'any of its first {len(checked)} lines'
        raise ValueError(f'{where}:{checked[0][0]}: {checked[0][2]} (nor is {span} a sample)')
    return records


def check_images(meta, root, records):
    """One of the first images `records` of `meta` name must be a file under `root` (a wrong folder
    would otherwise show only as every sample bad)."""
    reasons = []
    for n, rec in records:
        try:
            path = guard.confined_path(root, rec['filename'])
        except guard.BadSample as e:
            reasons.append(f'{meta}:{n}: {e}')
            continue
        if os.path.isfile(path):
            return
        reasons.append(f'{meta}:{n}: no file {path}')
    if reasons:
        raise ValueError(f'config.data.train_root: none of the first {len(reasons)} images of {meta} is a file under '
                         f'{root!r} ({reasons[0]}); check the image folder and the filenames')
