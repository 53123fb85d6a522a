"""A checkpoint write that dies half-way raises and leaves the previous checkpoint loadable."""
import io

import pytest
import torch

import checkpoints


def test_failed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    """A save_checkpoint that dies half-way raises and leaves the previous last.pt intact."""
    path = tmp_path / 'last.pt'
    first = {'step': 3, 'weights': torch.arange(12.0).view(3, 4), 'queue_ptr': 8}
    checkpoints.save_checkpoint(path, first)
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        half = buf.getvalue()[:len(buf.getvalue()) // 2]
        if hasattr(f, 'write'):
            f.write(half)
        else:
            with open(f, 'wb') as out:
                out.write(half)
        raise OSError('No space left on device')

    monkeypatch.setattr(torch, 'save', torn_save)
    with pytest.raises(OSError, match='No space left'):
        checkpoints.save_checkpoint(path, {'step': 6, 'weights': torch.zeros(3, 4), 'queue_ptr': 16})
    monkeypatch.undo()
    loaded = checkpoints.safe_load(path)
    assert loaded.keys() == first.keys() and loaded['step'] == 3 and loaded['queue_ptr'] == 8
    assert torch.equal(loaded['weights'], first['weights'])
