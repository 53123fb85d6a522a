"""A corpus given wrong in one of the common ways (a meta file in UTF-16, one JSON array, another
caption key, a wrong image folder, a shard packed as all images then all captions, data.shards
naming a folder) is refused before any work, in one line naming file:line and what was expected;
during a run, a guard that gives up names the first failures with their kind and file:line."""
import io
import json
import tarfile

import pytest

import checks
import guard
import loader
import train
from helpers import data_config, run, smoke_config, smoke_overrides, write_jpeg

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


def mistake(name, tmp_path, demo_dir):
    """(config overrides, the config error's message) of one common mistake."""
    meta, recs = tmp_path / 'meta.jsonl', records(demo_dir)
    if name in ('utf16', 'utf32'):
        meta.write_text(jsonl(recs), encoding=name.replace('utf', 'utf-'))
        enc = name.upper().replace('UTF', 'UTF-')
        return {'data.train_meta': meta}, (f'config.data.train_meta: {meta}:1: {enc} text (it starts with a {enc} '
                                           f'byte-order mark); JSON Lines must be UTF-8: convert it, e.g. iconv -f '
                                           f'{enc} -t UTF-8')
    if name == 'utf16_without_bom':
        meta.write_bytes(jsonl(recs).encode('utf-16-le'))
        return {'data.train_meta': meta}, (f'config.data.train_meta: {meta}:1: NUL bytes: UTF-16 or UTF-32 text '
                                           f'without a byte-order mark? JSON Lines is UTF-8 (nor is any of its '
                                           f'first 20 lines a sample)')
    if name == 'json_array':
        meta.write_text('\n' + json.dumps(recs, indent=2))
        return {'data.train_meta': meta}, (f'config.data.train_meta: {meta}:2: a JSON array, expected JSON Lines (one '
                                           f'object a line: {{"filename": ..., "caption": ...}}): convert it, e.g. '
                                           f'jq -c ".[]"')
    if name == 'caption_key':
        meta.write_text(jsonl({'filename': r['filename'], 'text': r['caption']} for r in recs))
        return {'data.train_meta': meta}, (f"config.data.train_meta: {meta}:1: keys ['filename', 'text'], {EXPECTED} "
                                           f'(nor is any of its first 20 lines a sample)')
    if name == 'image_root':
        root = demo_dir / 'val'
        return {'data.train_root': root}, (f"config.data.train_root: none of the first 20 images of "
                                           f"{demo_dir / 'train.jsonl'} is a file under '{root}' ("
                                           f"{demo_dir / 'train.jsonl'}:1: no file {root / 'train_000000.jpg'}); "
                                           f'check the image folder and the filenames')
    if name == 'grouped_shard':
        grouped_shard(demo_dir, tmp_path / 'g-0.tar')
        return {'data.format': 'wds', 'data.shards': tmp_path / '*.tar'}, (
            f'config.data.shards: {tmp_path / "g-0.tar"}: none of its first 20 members (000000.jpg, 000001.jpg, '
            f'000002.jpg, ...) is an image with its .txt caption beside it; expected each sample\'s members '
            f'together (KEY.jpg, KEY.txt, ...), as a tar of the files sorted by name holds them')
    folder = demo_dir / 'shards'
    return {'data.format': 'wds', 'data.shards': folder}, (
        f"config.data.shards: {folder} is a folder, not a tar shard: name the shards in it, e.g. '{folder}/*.tar'")


MISTAKES = ['utf16', 'utf32', 'utf16_without_bom', 'json_array', 'caption_key', 'image_root', 'grouped_shard',
            'shards_folder']


@pytest.mark.parametrize('name', MISTAKES)
def test_a_common_corpus_mistake_is_named_before_any_work(tmp_path, demo_dir, name):
    """Each of these once trained into '100 consecutive bad samples around position 0' (or 'no good
    sample to replace ...') with no file, line or hint. (Break caught: a pre-flight check removed.)"""
    over, message = mistake(name, tmp_path, demo_dir)
    with pytest.raises(ValueError) as e:
        train.train(smoke_config(demo_dir, **over), tmp_path / 'w')
    assert str(e.value) == message
    assert not (tmp_path / 'w').exists()


def test_the_command_line_says_it_in_one_line(tmp_path, demo_dir):
    over, message = mistake('caption_key', tmp_path, demo_dir)
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'w'),
               *smoke_overrides(demo_dir, **over)], timeout=300)
    assert res.returncode == 1 and res.stdout == ''
    assert res.stderr.splitlines() == [f'config error: {message}']


def test_a_few_bad_first_lines_among_good_ones_still_train(tmp_path, demo_dir):
    """The pre-flight refuses a corpus whose first lines all fail alike, never one with bad lines
    among good ones (those are counted by the loader), nor judges a line its read cut short."""
    recs = records(demo_dir, 3)
    meta = tmp_path / 'meta.jsonl'
    meta.write_bytes(b'\xef\xbb\xbf{"filename": 3}\n\n[1]\n\xff\xfe\n' + jsonl([{'filename': 'gone.jpg', 'caption': 'x'},
                                                                             *recs]).encode())
    checks.check_config(smoke_config(demo_dir, **{'data.train_meta': meta, 'data.val_meta': ''}))
    long = tmp_path / 'long.jsonl'
    long.write_text(json.dumps({**recs[0], 'caption': 'a red square ' * 100_000}) + '\n' + jsonl(recs))
    checks.check_config(smoke_config(demo_dir, **{'data.train_meta': long, 'data.val_meta': ''}))


# ---------------------------------------------------------------- in the run: the first failures, named

def test_the_consecutive_failure_guard_names_the_first_failures(tmp_path):
    """100 bad samples in a row (every line of this meta has another caption key) end with the
    first failure on the message's first line, kind and file:line, then the others seen."""
    write_jpeg(tmp_path / 'a.jpg')
    meta = tmp_path / 'meta.jsonl'
    meta.write_text(jsonl({'filename': 'a.jpg', 'text': f'cat {i}'} for i in range(3)))
    ds = loader.train_dataset(data_config(train_root=str(tmp_path), train_meta=str(meta), max_bad_rate=1.0))
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
        next(iter(loader.build_train_loader(cfg, rank=0, world=1, start_step=0, max_iter=1)))
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
