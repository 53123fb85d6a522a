"""The shipped configs: each fact set once, gpu_smoke keeping the full model, --print_config listing every key."""
import pytest

from configs import demo, r50, vitb32
from helpers import run


@pytest.mark.parametrize('config', [vitb32, r50])
def test_gpu_smoke_keeps_the_full_model_on_demo_data(config):
    full, smoke = config.get_config(), config.get_config('gpu_smoke')
    assert smoke.model.to_dict() == full.model.to_dict() and smoke.loss.to_dict() == full.loss.to_dict()
    assert smoke.max_iter == 200 and smoke.data.train_meta.endswith('demo/train.jsonl')


def test_each_config_fact_is_set_once(tmp_path):
    """Image size, context length and seed are one value each; every default path follows the
    data-folder rule ($DECLIP_DATA)."""
    for config in (demo.get_config('smoke'), r50.get_config()):
        config.data.image_size, config.model.context_length, config.data.seed = 48, 20, 7
        assert (config.model.image_size, config.data.context_length, config.seed) == (48, 20, 7)
    code = ('from configs import demo; c = demo.get_config(); '
            'print(c.data.bpe_path, c.data.synonyms_path, c.data.train_meta, c.data.val_root)')
    res = run(['-c', code], env={'DECLIP_DATA': str(tmp_path)})
    assert res.returncode == 0, res.stderr
    paths = res.stdout.split()
    assert len(paths) == 4 and all(p.startswith(str(tmp_path)) for p in paths), paths


def test_print_config_lists_every_key_with_its_value(tmp_path):
    res = run(['train.py', '--config', 'configs/vitb32.py', '--print_config', '--config.optim.base_lr=0.5'])
    assert res.returncode == 0, res.stderr[-2000:]
    for line in ('accum_steps: 1', 'base_lr: 0.5', 'batch_size: 128', 'queue_size: 65536', 'init_from:'):
        assert line in res.stdout, line
