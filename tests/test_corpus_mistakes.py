"""During a run, a guard that gives up on bad samples names the first failures with their kind and
file:line (or shard key) and what was expected, also from a loader worker."""
import io
import json
import tarfile

import pytest

import data
import guard
from helpers import data_config, run, smoke_overrides, write_jpeg

EXPECTED = 'expected an object with "filename" (a string) and "caption"'


def records(demo_dir, n=30):
    return [json.loads(line) for line in (demo_dir / 'train.jsonl').read_text().splitlines()[:n]]


def jsonl(recs):
    return ''.join(json.dumps(r) + '\n' for r in recs)


def grouped_shard(demo_dir, path, samples=12):
    """A shard of the demo's first samples packed as all images, then all captions (and .json)."""
    with tarfile.open(demo_dir / 'shards' / 'demo-000000.tar') as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()[:3 * samples] if m.isfile()]
    with tarfile.open(path, 'w') as out:
        for member, raw in sorted(members, key=lambda m: (not m[0].name.endswith('.jpg'), m[0].name)):
            out.addfile(member, io.BytesIO(raw))


def test_the_consecutive_failure_guard_names_the_first_failures(tmp_path):
    """100 bad samples in a row (every line of this meta has another caption key) end with the
    first failure on the message's first line, kind and file:line, then the others seen."""
    write_jpeg(tmp_path / 'a.jpg')
    meta = tmp_path / 'meta.jsonl'
    meta.write_text(jsonl({'filename': 'a.jpg', 'text': f'cat {i}'} for i in range(3)))
    ds = data.PairDataset(data_config(train_root=str(tmp_path), train_meta=str(meta), max_bad_rate=1.0))
    with pytest.raises(guard.DataError) as e:
        ds[(0, 0)]
    first, *others = str(e.value).splitlines()
    assert first == (f"100 consecutive bad samples around position 0; the first: {meta}:1: bad_json: keys ['filename', "
                     f"'text'], {EXPECTED}")
    assert sorted(others) == [f"  {meta}:{n}: bad_json: keys ['filename', 'text'], {EXPECTED}" for n in (2, 3)]


def test_no_good_sample_to_replace_names_the_first_failures(tmp_path, demo_dir):
    grouped_shard(demo_dir, tmp_path / 'g-0.tar', samples=3)
    cfg = data_config(format='wds', shards=str(tmp_path / 'g-0.tar'), eda=False, mask=False, batch_size=2,
                      bad_window=1000, max_bad_rate=1.0, shuffle_buffer=1)
    with pytest.raises(guard.DataError) as e:
        next(iter(data.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=1)))
    first = str(e.value).splitlines()[0]
    assert first.startswith(f'no good sample to replace {tmp_path / "g-0.tar"}:')
    assert first.endswith(f"; the first: {tmp_path / 'g-0.tar'}:000000: bad_tar: members ['jpg'], expected an image "
                          f"(jpg, jpeg, png, webp) and a txt caption side by side")


def test_the_rate_monitor_keeps_the_first_failures_beside_the_latest():
    monitor = guard.FailureMonitor(10, 0.5)
    with pytest.raises(guard.DataError) as e:
        for i in range(10):
            monitor.record(f'm.jsonl:{i + 1}: missing: {i}.jpg')
    assert str(e.value).splitlines() == [
        '100% of the last 10 samples could not be built (limit 50%, data.limits.max_bad_rate); the first: '
        'm.jsonl:1: missing: 0.jpg', *[f'  m.jsonl:{i + 1}: missing: {i}.jpg' for i in (1, 2, 5, 6, 7, 8, 9)]]


def test_a_data_error_raised_in_a_loader_worker_keeps_its_own_message():
    from torch._utils import ExceptionWrapper
    try:
        raise guard.DataError('100 consecutive bad samples around position 8; the first: m.jsonl:1: missing: a.jpg\n'
                              '  m.jsonl:2: missing: b.jpg')
    except guard.DataError:
        wrapped = ExceptionWrapper(where='in DataLoader worker process 0')
    with pytest.raises(guard.DataError) as e:
        wrapped.reraise()
    assert str(e.value).startswith('Caught DataError in DataLoader worker process 0')
    assert guard.error_message(e.value) == ('100 consecutive bad samples around position 8; the first: m.jsonl:1: '
                                            'missing: a.jpg\n  m.jsonl:2: missing: b.jpg')
    assert guard.error_message(guard.DataError('as raised')) == 'as raised'


def test_a_run_stopped_by_bad_samples_prints_the_message_not_a_traceback(tmp_path, demo_dir):
    """Every line but the first with another caption key: the pre-flight passes, the loader's worker
    gives up, and the command line prints the data error with its examples (torch.multiprocessing's
    traceback of the worker is not the message)."""
    recs = records(demo_dir, 240)
    meta = tmp_path / 'meta.jsonl'
    meta.write_text(jsonl([recs[0], *({'filename': r['filename'], 'text': r['caption']} for r in recs[1:])]))
    over = {'data.train_meta': meta, 'data.val_meta': '', 'data.workers': 1, 'data.limits.max_bad_rate': 1.0}
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'w'),
               *smoke_overrides(demo_dir, **over)], timeout=300)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    message = res.stderr[res.stderr.index('data error: '):].splitlines()
    assert message[0].startswith('data error: 100 consecutive bad samples around position ')
    assert f"; the first: {meta}:" in message[0] and message[0].endswith(f"bad_json: keys ['filename', 'text'], {EXPECTED}")
    assert 3 <= len(message) <= 8 and all(line.startswith(f'  {meta}:') for line in message[1:])
