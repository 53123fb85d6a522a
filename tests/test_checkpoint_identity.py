"""What a checkpoint records beyond its config (the global batch and the training data's identity)
and the resumes it refuses: another global batch (other processes or accum_steps), an edited meta
file, other shards; and the resume it allows, the same virtual devices over other processes."""
import hashlib
import shutil

import pytest
import torch

import checkpoints
import data
import loader
import shards
import train
from helpers import run, scalars, smoke_config, smoke_overrides


def smoke(demo_dir, **over):
    """The demo smoke config on the test corpus, one process, no compile, no evaluation; `over`: dotted keys."""
    return smoke_config(demo_dir, **{**over, 'data.val_meta': ''})


def checkpoint(workdir):
    return checkpoints.safe_load(workdir / 'checkpoints' / 'last.pt')


def short(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------- the identity itself

def test_jsonl_identity_is_the_record_count_and_the_metas_sha256_taken_while_indexing(tmp_path, demo_dir,
                                                                                      monkeypatch):
    """Two meta files: the record count skips blank lines, the sha256 is that of their bytes one
    after the other (one file: what sha256sum prints), and each meta is read once."""
    lines = (demo_dir / 'train.jsonl').read_text().splitlines(keepends=True)
    (tmp_path / 'a.jsonl').write_text(''.join(lines[:10]) + '\n  \n')
    (tmp_path / 'b.jsonl').write_text(''.join(lines[10:25]))
    cfg = smoke(demo_dir).data
    cfg.train_root = f'{demo_dir / "train"},{demo_dir / "train"}'
    cfg.train_meta = f'{tmp_path / "a.jsonl"},{tmp_path / "b.jsonl"}'
    scans = []
    real_scan = data.scan_lines
    monkeypatch.setattr(data, 'scan_lines', lambda path, **kw: scans.append(path) or real_scan(path, **kw))
    identity = loader.data_identity(cfg, loader.train_dataset(cfg))
    both = (tmp_path / 'a.jsonl').read_bytes() + (tmp_path / 'b.jsonl').read_bytes()
    assert identity == {'format': 'jsonl', 'records': 25, 'sha256': hashlib.sha256(both).hexdigest()}
    assert scans == [str(tmp_path / 'a.jsonl'), str(tmp_path / 'b.jsonl')]


def test_shard_identity_is_their_count_and_a_sha256_of_sorted_names_and_sizes(tmp_path):
    (tmp_path / 'b.tar').write_bytes(b'x' * 30)
    (tmp_path / 'a.tar').write_bytes(b'y' * 7)
    cfg = smoke(tmp_path).data
    cfg.format, cfg.shards = 'wds', str(tmp_path / '*.tar')
    want = hashlib.sha256(b'a.tar 7\nb.tar 30').hexdigest()
    assert loader.data_identity(cfg, loader.train_dataset(cfg)) == {'format': 'wds', 'shards': 2, 'sha256': want}
    (tmp_path / 'a.tar').write_bytes(b'y' * 8)   # rewritten to another size
    assert shards.shard_identity(shards.shard_paths(cfg.shards))['sha256'] != want


# ---------------------------------------------------------------- global batch (2 processes)

def test_another_global_batch_is_refused_and_the_same_one_resumes_over_other_processes(tmp_path, demo_dir,
                                                                                      two_process_smoke):
    """A 2-process run stopped at step 3: one process is refused naming the global batch before
    -> after (once, no traceback, the checkpoint untouched); --allow_config_change continues, saying
    what changed; 1 process x 2 micro-batches (the same 2 virtual devices) resumes without a flag
    and continues the uninterrupted 2-process run's losses, queues and pointer."""
    full, part, allowed = two_process_smoke['full'], tmp_path / 'part', tmp_path / 'allowed'
    no_eval = {'data.val_meta': ''}
    shutil.copytree(two_process_smoke['part'], part)     # the shared 2-process run stopped at step 3
    assert checkpoint(part)['batch_factors'] == [2, 1, 8] and checkpoint(part)['step'] == 3
    shutil.copytree(part, allowed)
    one = ['train.py', '--config', 'configs/demo.py:smoke', '--workdir']
    res = run([*one, str(part), *smoke_overrides(demo_dir, **no_eval)])
    change = 'global batch: 16 (2 processes x 1 micro-batches x 8) -> 8 (1 processes x 1 micro-batches x 8)'
    assert res.returncode != 0 and (res.stdout + res.stderr).count(change) == 1, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr and checkpoint(part)['step'] == 3
    res = run([*one, str(allowed), *smoke_overrides(demo_dir, **no_eval), '--allow_config_change'])
    assert res.returncode == 0, res.stderr[-3000:]
    assert change in res.stderr and '2 virtual devices (processes x micro-batches) become 1' in res.stderr
    assert checkpoint(allowed)['step'] == 6 and checkpoint(allowed)['batch_factors'] == [1, 1, 8]
    res = run([*one, str(part), *smoke_overrides(demo_dir, accum_steps=2, **no_eval)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'the same 2 virtual devices' in res.stderr and 'global batch:' not in res.stderr
    want, got = scalars(full, 'loss/total')[0], scalars(part, 'loss/total')[0]
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:   # GradCache against DDP: the same step up to float summation order
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    a, b = checkpoint(part), checkpoint(full)
    assert a['queue_ptr'] == b['queue_ptr'] and len(a['queues']) == len(b['queues']) == 2
    torch.testing.assert_close(a['queues'], b['queues'], rtol=1e-4, atol=1e-5)


def test_accum_steps_alone_changes_the_global_batch_and_is_refused(tmp_path, demo_dir):
    train.train(smoke(demo_dir, max_iter=2), tmp_path)
    with pytest.raises(checkpoints.ResumeRefused, match=r'global batch: 8 \(1 processes x 1 micro-batches x 8\) -> '
                                                      r'16 \(1 processes x 2 micro-batches x 8\)'):
        train.train(smoke(demo_dir, max_iter=3, accum_steps=2), tmp_path)
    assert checkpoint(tmp_path)['step'] == 2


# ---------------------------------------------------------------- training data (1 process)

@pytest.mark.parametrize('edit', ['drop_a_line', 'change_a_caption'])
def test_an_edited_meta_file_is_refused_naming_records_and_sha256(tmp_path, demo_dir, edit):
    meta = tmp_path / 'train.jsonl'
    shutil.copy(demo_dir / 'train.jsonl', meta)
    work, over = tmp_path / 'w', {'data.train_meta': meta}
    train.train(smoke(demo_dir, max_iter=2, **over), work)
    before = short(meta)
    lines = meta.read_text().splitlines(keepends=True)
    meta.write_text(''.join(lines[:-1]) if edit == 'drop_a_line' else lines[0].replace('"caption": "', '"caption": "a ')
                    + ''.join(lines[1:]))
    after, records = short(meta), 239 if edit == 'drop_a_line' else 240
    change = f'training data: jsonl: 240 records, meta sha256 {before} -> jsonl: {records} records, meta sha256 {after}'
    with pytest.raises(checkpoints.ResumeRefused) as refused:
        train.train(smoke(demo_dir, max_iter=3, **over), work)
    assert change in str(refused.value) and '--allow_config_change' in str(refused.value)
    assert checkpoint(work)['step'] == 2
    train.train(smoke(demo_dir, max_iter=3, **over), work, allow_config_change=True)
    saved = checkpoint(work)
    assert saved['step'] == 3 and saved['training_data']['sha256'][:16] == after
    assert saved['training_data']['records'] == records


def test_a_removed_shard_is_refused(tmp_path, demo_dir):
    folder = tmp_path / 'shards'
    folder.mkdir()
    for name in ('a.tar', 'b.tar'):
        shutil.copy(next((demo_dir / 'shards').glob('*.tar')), folder / name)
    work, over = tmp_path / 'w', {'data.format': 'wds', 'data.shards': folder / '*.tar'}
    train.train(smoke(demo_dir, max_iter=2, **over), work)
    before = checkpoint(work)['training_data']
    assert before['shards'] == 2
    (folder / 'b.tar').unlink()
    with pytest.raises(checkpoints.ResumeRefused, match=rf'training data: wds: 2 shards, names and sizes sha256 '
                                                      rf'{before["sha256"][:16]} -> wds: 1 shards'):
        train.train(smoke(demo_dir, max_iter=3, **over), work)


def test_a_checkpoint_without_the_records_resumes_with_a_warning(tmp_path, demo_dir, caplog):
    """A checkpoint of an older version: its data are not checked (a warning); its global batch is
    still known from its world size and config, so a changed one is still refused."""
    ckpt = tmp_path / 'checkpoints' / 'last.pt'
    train.train(smoke(demo_dir, max_iter=2), tmp_path)
    old = {k: v for k, v in checkpoints.safe_load(ckpt).items() if k not in ('batch_factors', 'training_data')}
    checkpoints.save_checkpoint(ckpt, {**old, 'world_size': 2})
    with pytest.raises(checkpoints.ResumeRefused, match=r'global batch: 16 \(2 processes x 1 micro-batches x 8\) -> 8'):
        train.train(smoke(demo_dir, max_iter=3), tmp_path)
    checkpoints.save_checkpoint(ckpt, old)
    caplog.clear()
    train.train(smoke(demo_dir, max_iter=3), tmp_path)
    assert 'records no identity of its training data (written by an older version)' in caplog.text
    assert checkpoint(tmp_path)['step'] == 3 and checkpoint(tmp_path)['training_data']['records'] == 240


@pytest.mark.parametrize('key, value, refused', [('model.grad_checkpointing', True, False),
                                                 ('model.checkpoint_image_stages', 2, False),
                                                 ('model.embed_dim', 64, True)])
def test_recomputation_may_change_at_resume(demo_dir, key, value, refused):
    """Recomputing activations trades memory for time and changes no number (tests/test_model.py),
    so a run that ran out of memory resumes with it on; another model size is still refused."""
    cfg = smoke(demo_dir)
    saved = cfg.to_dict()
    section, leaf = key.split('.')
    cfg[section][leaf] = value
    if refused:
        with pytest.raises(checkpoints.ResumeRefused, match=key):
            checkpoints.check_resumed_config(saved, cfg, 'last.pt', allow_change=False)
    else:
        checkpoints.check_resumed_config(saved, cfg, 'last.pt', allow_change=False)
