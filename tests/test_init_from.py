"""config.init_from: a run starts from a file's weights with fresh heads; a file of another shape names the key."""
import checkpoints
import torch

import train
import trainstep
import weights
from helpers import run, smoke_config, smoke_overrides


def _features(model, g):
    images = torch.randn(2, 3, 64, 64, generator=g)
    tokens = torch.randint(1, 1000, (2, 24), generator=g)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_init_from_starts_with_the_files_weights_and_fresh_heads(tmp_path, demo_dir, capsys):
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / 'a'),
               *smoke_overrides(demo_dir, max_iter=2, **{'data.val_meta': ''})])
    assert res.returncode == 0, res.stderr[-2000:]
    source = tmp_path / 'a' / 'checkpoints' / 'last.pt'
    cfg = smoke_config(demo_dir, init_from=source)
    state = trainstep.build_state(cfg, torch.device('cpu'))
    start = train.init_weights(state, cfg)
    reference, _ = weights.load_model(source)
    state.model.eval()
    for ours, theirs in zip(_features(state.model, torch.Generator().manual_seed(0)),
                            _features(reference, torch.Generator().manual_seed(0))):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert start.startswith(f'initialised from {source}') and 'fresh' not in start
    # a run started from it records where it came from, and its first loss is not a fresh model's
    train.train(smoke_config(demo_dir, max_iter=1, init_from=source, **{'data.val_meta': ''}), tmp_path / 'b')
    out = capsys.readouterr().out
    assert f'initialised from {source}' in out and 'global batch 8 = 1 processes x 1 micro-batches x 8' in out
    assert checkpoints.safe_load(tmp_path / 'b' / 'checkpoints' / 'last.pt')['config']['init_from'] == str(source)
    assert (tmp_path / 'b' / 'config.json').is_file()


def test_init_from_a_file_of_another_shape_names_the_key(tmp_path, demo_dir):
    train.train(smoke_config(demo_dir, max_iter=1, **{'data.val_meta': ''}), tmp_path / 'a')
    cfg = smoke_config(demo_dir, init_from=tmp_path / 'a' / 'checkpoints' / 'last.pt', **{'model.embed_dim': 64})
    state = trainstep.build_state(cfg, torch.device('cpu'))
    try:
        train.init_weights(state, cfg)
    except ValueError as e:
        assert 'config.init_from' in str(e) and 'size mismatch' in str(e)
    else:
        raise AssertionError('a shape mismatch was accepted')
