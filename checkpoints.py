"""Checkpoints: the files (tensors and plain types only, atomic writes, the newest readable copy,
kept copies), and resume and save: the checkpoint's config, global batch and training data against
this run's.

`train.py` resumes and saves with these; `weights.py` reads and writes checkpoint files with them.
"""

import math
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from absl import logging

import guard
import images
import losses

# ----------------------------------------------------------------------------------------------
# Checkpoint files: tensors and plain types only, atomic writes, newest readable copy
# ----------------------------------------------------------------------------------------------

class UnsafeCheckpoint(RuntimeError):
    pass


def safe_load(path):
    """torch.load with weights_only=True: a file that needs code execution to load is refused, one
    that torch.load cannot read at all is not a checkpoint."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ['']
        said = next((line for line in lines if 'unsupported' in line.lower()), lines[0])[:200]
        if 'unsupported global' in said.lower():   # the weights-only unpickler's word for code to run
            raise UnsafeCheckpoint(f'{path}: refused, the file needs arbitrary code execution to load (only '
                                   f'tensors and plain types are accepted): {said}') from None
        raise RuntimeError(f'{path}: not a checkpoint (torch.load cannot read it: {type(e).__name__}: '
                           f'{said})') from None


def save_checkpoint(path, state):
    """Write to a temporary file, fsync, rename: a crash never leaves a partial `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


KEPT_COPY = re.compile(r'step_(\d+)\.pt')


def _kept_copies(ckpt_dir):
    """step_<N>.pt files, oldest first (other names, e.g. a user's step_best.pt, are not ours)."""
    found = ((m, p) for p in Path(ckpt_dir).glob('step_*.pt') if (m := KEPT_COPY.fullmatch(p.name)))
    return [p for _, p in sorted((int(m.group(1)), p) for m, p in found)]


def load_checkpoint(path):
    """safe_load of a file that must be one of our checkpoints (a dict with model and step)."""
    state = safe_load(path)
    if not isinstance(state, dict) or not {'model', 'step', 'config'} <= state.keys():
        kind = type(state).__name__ if not isinstance(state, dict) else f'a dict with keys {sorted(state)[:6]}'
        raise RuntimeError(f'{path}: not a training checkpoint (expected a dict with model, step and config; '
                           f'found {kind})')
    return state


def find_checkpoint(ckpt_dir, warn=print):
    """(path, state, unreadable) of last.pt, else of the newest readable kept copy; `unreadable`
    lists the (path, error) of files that exist but could not be read (each warned about)."""
    unreadable = []
    for path in [Path(ckpt_dir) / 'last.pt', *reversed(_kept_copies(ckpt_dir))]:
        if path.is_file():
            try:
                return path, load_checkpoint(path), unreadable
            except Exception as e:  # noqa: BLE001 - try the next copy
                warn(f'skipping unreadable checkpoint {path}: {e}')
                unreadable.append((path, e))
    return None, None, unreadable


def prune_copies(ckpt_dir, keep):
    """Delete all but the newest `keep` kept copies (keep 0: delete none)."""
    if keep > 0:
        for old in _kept_copies(ckpt_dir)[:-keep]:
            old.unlink()


# ----------------------------------------------------------------------------------------------
# Resume and save: the checkpoint's config against this run's, the newest readable copy, writes
# ----------------------------------------------------------------------------------------------

def leaves(tree, prefix=''):
    """{'a.b': value} of a nested dict (tuples as lists: a checkpoint's config compares equal)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(leaves(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
    return out


def matches(key, patterns):
    return any(key.startswith(p) if p.endswith('.') else key == p for p in patterns)


def config_changes(saved, current, defining, exempt=()):
    """(a line per changed key, the lines of those that match `defining` but not `exempt`) between a
    checkpoint's config and this run's. A key only one of them has (another version of the code) is
    a change but never a defining one."""
    old, new = leaves(saved), leaves(current)
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k, '<absent>') != new.get(k, '<absent>')]
    lines = {k: f'  {k}: {old.get(k, "<absent>")!r} -> {new.get(k, "<absent>")!r}' for k in keys}
    return list(lines.values()), [line for k, line in lines.items()
                                  if matches(k, defining) and not matches(k, exempt) and k in old and k in new]


RUN_DEFINING = ('model.', 'loss.', 'optim.', 'seed', 'data.seed', 'data.batch_size', 'data.format',
                'data.train_root', 'data.train_meta', 'data.shards', 'data.views', 'data.image_size',
                'data.crop_scale', 'data.eda', 'data.eda_synonyms', 'data.mask', 'data.context_length',
                'data.augmentation', 'data.shuffle_buffer')   # accum_steps: through the global batch
# model keys that trade memory for time and change no number a step computes: a resume may change
# them (a run that ran out of memory resumes with recomputation on)
MEMORY_FOR_TIME = ('model.grad_checkpointing', 'model.checkpoint_image_stages')


class ResumeRefused(ValueError):
    """A resume that would change what the run computes; the command line prints it without a traceback."""


def run_identity(cfg, world, training_data):
    """What a checkpoint records of the run beyond its config, for a resume to compare: the global
    batch's factors (processes x accum_steps x data.batch_size: the config alone does not fix it)
    and the training data's identity (loader.data_identity)."""
    return {'batch_factors': [world, cfg.accum_steps, cfg.data.batch_size], 'training_data': training_data}


def _batch(factors):
    world, accum, batch = factors
    return f'{world * accum * batch} ({world} processes x {accum} micro-batches x {batch})'


def _data(identity):
    what = (f'{identity["records"]:,} records, meta' if identity['format'] == 'jsonl'
            else f'{identity["shards"]:,} shards, names and sizes')
    return f'{identity["format"]}: {what} sha256 {identity["sha256"][:16]}'


def input_changes(saved, identity, path):
    """Lines '  what: before -> after' where the checkpoint's global batch or training data differ
    from this run's (`identity`: run_identity). A checkpoint written before they were recorded has
    its global batch from its world size and config; its data cannot be checked (a warning)."""
    if not identity:
        return []
    config, lines = saved['config'], []
    before = saved.get('batch_factors') or [saved['world_size'], config.get('accum_steps', 1),
                                            config['data']['batch_size']]
    if math.prod(before) != math.prod(identity['batch_factors']):
        lines.append(f'  global batch: {_batch(before)} -> {_batch(identity["batch_factors"])}')
    data = saved.get('training_data')
    if data is None:
        logging.warning('%s records no identity of its training data (written by an older version): '
                        'the data are not checked', path)
    elif data != identity['training_data']:
        lines.append(f'  training data: {_data(data)} -> {_data(identity["training_data"])}')
    return lines


def check_resumed_config(saved, cfg, path, allow_change, inputs=()):
    """Refuse (unless allowed) a resume whose config changes what the run computes: model,
    losses, optimiser, batch size, data sources and order; warn for the rest (max_iter too:
    extending a run is deliberate, though it reshapes the rest of the cosine schedule). `inputs`:
    input_changes' lines (global batch, training data), refused alike."""
    saved_data = saved.get('data', {})
    if saved_data.get('augmentation') in images.RENAMED:   # a run from before the rename: the same views
        saved = {**saved, 'data': {**saved_data, 'augmentation': images.RENAMED[saved_data['augmentation']]}}
    lines, refused = config_changes(saved, cfg.to_dict(), RUN_DEFINING, MEMORY_FOR_TIME)
    refused, lines = refused + list(inputs), lines + list(inputs)
    if refused and not allow_change:
        raise ResumeRefused(f'{path} belongs to a run with another config; resuming would change it:\n'
                            + '\n'.join(refused) + '\nuse the same config, number of processes and data, another '
                            '--workdir, or --allow_config_change')
    if lines:
        logging.warning('resuming %s with a changed config:\n%s', path, '\n'.join(lines))


def resume(state, cfg, ckpt_dir, world, *, start_over=False, allow_change=False):
    """Continue from the newest readable checkpoint of the workdir, if there is one. Checkpoints
    that exist but none of which can be read stop the run (unless `start_over`: they are then
    renamed *.unreadable and the run starts from step 0). state.inputs (run_identity) is compared
    with what the checkpoint recorded."""
    path, saved, unreadable = find_checkpoint(ckpt_dir, warn=logging.warning)
    rank = losses.world_info()[0]
    if saved is None and unreadable and not start_over:
        raise RuntimeError('no readable checkpoint in {}:\n{}\nrepair or move them, or pass --start_over to '
                           'start from step 0'.format(ckpt_dir, '\n'.join(f'  {p}: {e}' for p, e in unreadable)))
    if saved is None:
        if unreadable and world > 1:
            dist.barrier()  # every rank has looked before rank 0 renames
        for bad, _ in unreadable if rank == 0 else ():
            bad.rename(bad.with_name(bad.name + '.unreadable'))
        return
    check_resumed_config(saved['config'], cfg, path, allow_change, input_changes(saved, state.inputs, path))
    state.load_state_dict({**saved, 'bad_totals': guard.from_kinds(saved['bad_totals'])})
    if rank == 0:
        logging.info('resumed from %s at step %d', path, state.step)
        note_regrouping(saved, cfg.accum_steps, world)


def note_regrouping(saved, accum, world):
    """How a run resumed with other processes or accum_steps goes on: the same virtual devices
    (processes x accum_steps) exactly; others with another data order, NN queues fresh or dropped."""
    was_world, was_accum = saved['world_size'], saved['config'].get('accum_steps', 1)
    before, after = was_world * was_accum, world * accum
    if (was_world, was_accum) == (world, accum):
        return
    head = (f'resuming a {was_world}-process run with {world} processes' if was_world != world
            else f'resuming with accum_steps {was_accum} -> {accum}')
    if before == after:
        logging.info('%s x %d micro-batches: the same %d virtual devices, data order and NN queues', head, accum, after)
    else:
        logging.warning('%s: %d virtual devices (processes x micro-batches) become %d: the data order changes '
                        'and the NN queues of virtual devices >= %d %s', head, before, after, min(before, after),
                        'start fresh' if after > before else 'are dropped')


def save(state, cfg, ckpt_dir):
    """last.pt (and every keep_every steps a kept copy), written by rank 0 for all ranks. Weights
    that are not finite are never written (every rank holds the same parameters, so all agree)."""
    if not torch.stack([p.isfinite().all() for p in state.model.parameters()]).all():
        raise SystemExit(f'step {state.step}: the weights are not finite; no checkpoint written (the last good '
                         f'one in {ckpt_dir} stays)')
    saved = state.state_dict(cfg.to_dict())
    if saved is None:
        return
    saved['bad_totals'] = guard.by_kind(saved['bad_totals'])
    paths = [ckpt_dir / 'last.pt'] + [ckpt_dir / f'step_{state.step}.pt'] * (
        state.step % cfg.keep_every == 0 or state.step == cfg.max_iter)
    for path in paths:
        save_checkpoint(path, saved)
    prune_copies(ckpt_dir, cfg.keep_copies)
    logging.info('step %d: wrote %s', state.step, ', '.join(p.name for p in paths))
