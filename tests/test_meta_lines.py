"""Training meta lines: a BOM, CRLF and blank lines are not samples, and messages name the true file:line."""
import json

import data
import guard
import loader
from helpers import data_config, write_jpeg


def test_blank_and_crlf_lines_are_not_samples_and_lines_are_named(tmp_path):
    write_jpeg(tmp_path / 'a.jpg')
    good = json.dumps({'filename': 'a.jpg', 'caption': 'a cat'})
    lines = [good, '   ', '', '\t', good, '{"filename": "a.jpg", "caption": ', '  \t ', good]
    raw = '\ufeff'.encode() + '\r\n'.join(lines).encode() + b'\r\n \r\n'
    (tmp_path / 'meta.jsonl').write_bytes(raw)
    cfg = data_config(train_root=str(tmp_path), train_meta=str(tmp_path / 'meta.jsonl'), bad_window=1000)
    ds = loader.train_dataset(cfg)
    assert len(ds) == 4
    assert [ds.dataset.meta.where(i).rsplit(':', 1)[1] for i in range(4)] == ['1', '5', '6', '8']
    for i in (0, 1, 3):
        assert ds[(i, i)]['bad'].sum() == 0                                # BOM and CRLF parse
    assert ds[(2, 2)]['bad'][guard.BAD_KINDS.index('bad_json')] == 1
    assert 'meta.jsonl:6: bad_json' in ds.monitor.examples[-1]
    line_starts = [0] + [i + 1 for i, b in enumerate(raw) if b == ord('\n')]
    for chunk in (3, 7, 1 << 20):
        offsets = data.index_lines(tmp_path / 'meta.jsonl', chunk=chunk)
        assert offsets.tolist() == [line_starts[n - 1] for n in (1, 5, 6, 8)]
