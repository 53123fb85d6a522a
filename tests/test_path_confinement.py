"""Meta filenames cannot leave the image root; the root's own symlinks are followed, to regular files only."""
import os

import pytest

import guard
import loader
from helpers import data_config, write_jpeg, write_meta


def test_paths_outside_the_root_are_refused(tmp_path):
    """A meta line cannot leave the root; the root's own symlinks are followed, to regular files only."""
    root = tmp_path / 'root'
    (root / 'sub').mkdir(parents=True)
    write_jpeg(root / 'good.jpg')
    write_jpeg(tmp_path / 'elsewhere.jpg')
    os.symlink(tmp_path / 'elsewhere.jpg', root / 'linked.jpg')   # the owner's link: followed
    os.symlink('/dev/zero', root / 'zero.jpg')                    # followed, but not a regular file
    os.symlink(root, tmp_path / 'alias')                          # a root that is itself a symlink
    cases = [('good.jpg', None), ('/good.jpg', None), ('linked.jpg', None), ('zero.jpg', 'not_regular'),
             ('../elsewhere.jpg', 'outside_root'), ('/../elsewhere.jpg', 'outside_root'),
             ('sub/../../elsewhere.jpg', 'outside_root'), ('sub/../good.jpg', 'outside_root'),
             (str(tmp_path / 'elsewhere.jpg'), 'missing'), ('../root2/x.jpg', 'outside_root'),
             ('good.jpg\0.png', 'bad_name')]   # its own kind, not 'other'
    write_meta(tmp_path / 'meta.jsonl', [{'filename': f, 'caption': 'a cat'} for f, _ in cases])
    for r in (root, tmp_path / 'alias'):
        ds = loader.train_dataset(data_config(train_root=str(r), train_meta=str(tmp_path / 'meta.jsonl'), bad_window=1000))
        for i, (filename, kind) in enumerate(cases):
            bad = dict(zip(guard.BAD_KINDS, ds[(i, i)]['bad'].tolist()))
            assert (bad[kind] >= 1) if kind else sum(bad.values()) == 0, (filename, bad)
    assert guard.confined_path(str(root), '/sub/x.jpg') == str(root / 'sub' / 'x.jpg')   # the reference's rule
    assert guard.confined_path('', '/abs/x.jpg') == '/abs/x.jpg'   # no root: nothing to leave


def test_a_path_is_checked_before_the_caption(tmp_path):
    """A line whose filename leaves the root, or holds a NUL, and whose caption is empty counts as
    the path's kind, as the path was always checked first. Break it catches: the caption checked
    before the path is located."""
    write_jpeg(tmp_path / 'good.jpg')
    cases = [('../good.jpg', '', 'outside_root'), ('good\0.jpg', '  ', 'bad_name'), ('good.jpg', ' ', 'empty_caption')]
    meta = write_meta(tmp_path / 'meta.jsonl', [{'filename': f, 'caption': c} for f, c, _ in cases])
    for line, (_, _, kind) in enumerate(cases, 1):
        ds = loader.train_dataset(data_config(train_root=str(tmp_path), train_meta=str(meta), max_bad_rate=1.0))
        with pytest.raises(guard.DataError):   # every line is bad: 100 failures in a row
            ds[(line - 1, 0)]
        assert ds.monitor.first[0].startswith(f'{meta}:{line}: {kind}: '), ds.monitor.first
