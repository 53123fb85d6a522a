"""Training loop, schedule, parameter groups, config errors, checkpoints/resume, evaluation, loading."""
import checkpoints
import json
import math
import os

import pytest
import torch

import data
import declip
import evaluate
import text
import trainstep
import weights
from configs import demo, r50, vitb32
from helpers import run, scalars, smoke_overrides, torchrun
from tiny_step import nonfinite_at

# ---------------------------------------------------------------- schedule and groups

def spec_lr(t):
    """The reference's CosineLRScheduler with its own numbers: 1e-4 -> 1e-3 over 2,500 steps, cosine to 0 at 128,001."""
    if t < 2500:
        return 1e-4 + (1e-3 - 1e-4) * (t - 1) / 2499
    return 0 + (1e-3 - 0) * 0.5 * (1 + math.cos(math.pi * (t - 2500) / (128001 - 2500)))


@pytest.mark.parametrize('t', [1, 2, 1250, 2499, 2500, 2501, 10_000, 64_000, 128_000, 128_001])
def test_lr_schedule(t):
    cfg = vitb32.get_config()
    assert trainstep.lr_at(t, cfg.optim, cfg.max_iter) == pytest.approx(spec_lr(t), rel=1e-12, abs=1e-15)


def spec_no_decay(name):
    """The reference's param_group_all, by name: biases of Linear/Conv/BN/LN, BN and LN weights, logit_scale."""
    if name == 'logit_scale':
        return True
    if name.endswith('.bias') and not name.endswith('in_proj_bias'):
        return True
    leaf = name.split('.')[-2]
    return name.endswith('.weight') and (leaf.startswith(('ln', 'bn')) or leaf in ('1',) and 'downsample' in name)


@pytest.mark.parametrize('config', [vitb32, r50])
def test_parameter_groups_follow_the_spec(config):
    with torch.device('meta'):
        model = declip.build_model(config.get_config().model)
    decay, no_decay = trainstep.param_groups(model, 0.1)
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: False for p in decay['params']} | {names[id(p)]: True for p in no_decay['params']}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable
    for name, flag in got.items():
        assert flag == spec_no_decay(name), name
    for name in ('encode_text.token_embedding.weight', 'encode_text.positional_embedding',
                 'encode_text.transformer.resblocks.0.attn.in_proj_bias'):
        assert got[name] is False


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


# ---------------------------------------------------------------- config errors

def test_unknown_override_key_names_it(tmp_path):
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path),
               '--config.optim.lrr=3e-4'])
    assert res.returncode != 0 and 'lrr' in res.stderr


# ---------------------------------------------------------------- end to end (2 processes)

def test_two_process_run_logs_checkpoints_and_resumes_exactly(tmp_path, demo_dir):
    full, part = tmp_path / 'full', tmp_path / 'part'
    res = torchrun(full, smoke_overrides(demo_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    losses_full, tags = scalars(full, 'loss/total')
    expected = {'loss/total', 'loss/clip', 'loss/nn', 'loss/simsiam', 'loss/mlm', 'train/lr', 'train/logit_scale',
                'train/grad_norm', 'perf/img_per_s', 'perf/img_per_s_per_device', 'perf/step_ms',
                'perf/data_wait_frac', 'mem/peak_gib', 'eval/zeroshot_top1', 'eval/zeroshot_top5'}
    expected |= {'samples/bad_total'}
    assert not [t for t in tags['scalars'] if t.startswith('data/')]
    assert expected <= set(tags['scalars'])
    assert {'views/0', 'views/1'} <= set(tags['images'])
    assert sorted(losses_full) == [1, 2, 3, 4, 5, 6]
    state = checkpoints.safe_load(full / 'checkpoints' / 'last.pt')
    assert state['step'] == 6 and len(state['queues']) == 2 and state['world_size'] == 2
    assert not torch.equal(state['queues'][0], state['queues'][1])
    # the same run stopped after 3 steps and resumed: identical per-step losses
    res = torchrun(part, smoke_overrides(demo_dir, stop_at=3))
    assert res.returncode == 0, res.stderr[-3000:]
    res = torchrun(part, smoke_overrides(demo_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'resumed from' in res.stderr
    losses_part, _ = scalars(part, 'loss/total')
    for step in range(1, 7):
        assert losses_part[step] == pytest.approx(losses_full[step], rel=1e-6, abs=1e-6), step
    # continuing the 2-process run with one process halves the global batch: allowed only when asked
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(part), '--allow_config_change',
               *smoke_overrides(demo_dir, max_iter=8)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'global batch: 16 (2 processes x 1 micro-batches x 8) -> 8 (1 processes x 1 micro-batches x 8)' in res.stderr
    assert checkpoints.safe_load(part / 'checkpoints' / 'last.pt')['step'] == 8


FAKE_TORCHVISION_IO = """# stand-in for torchvision.io.decode_jpeg in tests (Pillow underneath)
import enum
import io

import numpy as np
import torch
from PIL import Image


class ImageReadMode(enum.Enum):
    RGB = 3


def decode_jpeg(blobs, mode=ImageReadMode.RGB, device='cpu'):
    images = [Image.open(io.BytesIO(bytes(b.numpy()))).convert('RGB') for b in blobs]
    return [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).to(device) for im in images]
"""


def test_device_decode_run_equals_host_run(tmp_path, demo_dir):
    """data.decode='device' through train.py, torchvision replaced by a Pillow stand-in: the same
    crops of the same pixels, so the same losses as the host path (no draft reduction applies
    to the 80x80 demo images at 64 px)."""
    package = tmp_path / 'site' / 'torchvision'
    package.mkdir(parents=True)
    (package / '__init__.py').write_text('')
    (package / 'io.py').write_text(FAKE_TORCHVISION_IO)
    losses = {}
    for mode in ('host', 'device'):
        res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path / mode),
                   *smoke_overrides(demo_dir, stop_at=3, **{'data.decode': mode})],
                  env={'PYTHONPATH': str(tmp_path / 'site')})
        assert res.returncode == 0, res.stderr[-3000:]
        losses[mode], _ = scalars(tmp_path / mode, 'loss/total')
    assert sorted(losses['device']) == [1, 2, 3]
    for step in (1, 2, 3):
        assert losses['device'][step] == pytest.approx(losses['host'][step], rel=1e-6), step


def test_device_decode_without_torchvision_fails_before_work(tmp_path, demo_dir):
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path),
               *smoke_overrides(demo_dir, **{'data.decode': 'device'})])
    assert res.returncode != 0 and "data.decode='device' needs torchvision" in res.stderr
    assert not (tmp_path / 'checkpoints').exists()


def test_evaluate_cli_on_a_smoke_checkpoint(tmp_path, demo_dir):
    vocabulary = tmp_path / 'vocab' / data.BPE_PATH.name   # the run's own copy of the vocabulary
    vocabulary.parent.mkdir()
    vocabulary.write_bytes(data.BPE_PATH.read_bytes())
    res = run(['train.py', '--config', 'configs/demo.py:smoke', '--workdir', str(tmp_path),
               *smoke_overrides(demo_dir, max_iter=2, **{'data.bpe_path': vocabulary})])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / 'checkpoints' / 'last.pt'
    assert weights.load_model(ckpt)[0].bpe_path == vocabulary   # evaluation tokenizes with it
    res = run(['evaluate.py', '--ckpt', str(tmp_path), '--workers', '0'])   # a workdir, the run's eval.prompts
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / 'checkpoints' / 'last.zeroshot.json').read_text())
    assert metrics['images'] == 60 and metrics['kind'] == 'ours' and metrics['checkpoint'] == str(ckpt)
    assert metrics['prompts'] == 'prompt1'
    # the same number computed directly: prompt ensemble over the classes present, argmax
    model, preprocess = weights.load_model(ckpt)
    records = [json.loads(line) for line in (demo_dir / 'val.jsonl').read_text().splitlines()]
    classes = sorted({(r['label'], r['label_name']) for r in records})
    tok = data.get_tokenizer()
    templates = text.load_prompts('prompt1')
    assert templates == ['a photo of a {0}.']
    assert len(text.load_prompts('prompt8')) == 8 and text.load_prompts('prompt8')[0] == 'a photo of a {0}'
    from PIL import Image
    with torch.no_grad():
        cls = []
        for _, name in classes:
            emb = model.encode_text(tok([t.replace('{0}', name) for t in templates], 24))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            cls.append(mean / mean.norm())
        cls = torch.stack(cls)
        correct = 0
        for r in records:
            f = model.encode_image(preprocess(Image.open(demo_dir / 'val' / r['filename']))[None])[0]
            correct += int(classes[int((cls @ (f / f.norm())).argmax())][0] == r['label'])
    assert metrics['zeroshot_top1'] == pytest.approx(100 * correct / len(records), abs=1e-6)
    res = run(['evaluate.py', '--ckpt', str(ckpt), '--task', 'retrieval', '--workers', '0'])
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / 'checkpoints' / 'last.retrieval.json').read_text())
    assert r['pairs'] == 60 and 0 <= r['i2t_R@1'] <= r['i2t_R@5'] <= r['i2t_R@10'] <= 100
    (tmp_path / 'empty').mkdir()                # a wrong image folder: an error before any image is scored
    res = run(['evaluate.py', '--ckpt', str(ckpt), '--val_root', str(tmp_path / 'empty'), '--out', str(tmp_path / 'x')])
    assert res.returncode != 0 and not (tmp_path / 'x').exists()
    assert f"none of the first 60 images of {demo_dir / 'val.jsonl'} is a file under '{tmp_path / 'empty'}'" in res.stderr
    res = run(['evaluate.py', '--ckpt', str(ckpt), '--out', str(tmp_path / 'missing' / 'r.json')])  # refused first
    assert res.returncode != 0 and 'Traceback' not in res.stderr
    assert f"--out '{tmp_path / 'missing' / 'r.json'}': {tmp_path / 'missing' / 'r.json'} cannot be written" in res.stderr


def test_retrieval_metrics_against_brute_force():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(30, 8, generator=g), dim=-1)
    got = evaluate.retrieval_metrics(img, txt)
    sims = (img @ txt.T).tolist()
    for k in (1, 5, 10):
        i2t = sum(sorted(range(30), key=lambda j: -sims[i][j]).index(i) < k for i in range(30)) / 30
        t2i = sum(sorted(range(30), key=lambda j: -sims[j][i]).index(i) < k for i in range(30)) / 30
        assert got[f'i2t_R@{k}'] == pytest.approx(100 * i2t) and got[f't2i_R@{k}'] == pytest.approx(100 * t2i)


# ---------------------------------------------------------------- loading other checkpoint layouts

def _tiny(vision='vit'):
    cfg = demo.get_config('smoke')
    if vision == 'resnet':
        cfg = r50.get_config('smoke')
    torch.manual_seed(1)
    return declip.build_model(cfg.model).eval(), cfg


def _agree(a, b, text_ids):
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(a.encode_image(images), b.encode_image(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.encode_text(text_ids), b.encode_text(text_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('vision', ['vit', 'resnet'])
def test_load_reference_pth_tar(tmp_path, vision):
    model, _ = _tiny(vision)
    sd = {f'module.{k}': v for k, v in model.state_dict().items()}
    sd['module.logit_scale'] = sd['module.logit_scale'].reshape([])   # a scalar in some released files
    if vision == 'resnet':
        sd['module.visual.fc.weight'] = torch.zeros(128, 128)
        sd['module.visual.fc.bias'] = torch.zeros(128)
    torch.save({'model': sd, 'optimizer': {}, 'last_iter': 10}, tmp_path / 'ckpt.pth.tar')
    loaded, preprocess = weights.load_model(tmp_path / 'ckpt.pth.tar')
    assert loaded.kind == 'reference'
    text = data.tokenize(['a red circle'], 24)
    _agree(model, loaded, text)


def test_load_openai_state_dict(tmp_path):
    model, _ = _tiny()
    with torch.no_grad():
        model.encode_text.text_projection.bias.zero_()   # OpenAI has no bias
    sd = {k: v for k, v in model.state_dict().items() if k.startswith('visual.')}
    for k, v in model.state_dict().items():
        if k.startswith('encode_text.') and 'token_embedding' not in k and 'text_projection' not in k:
            sd[k[len('encode_text.'):]] = v
    emb = model.encode_text.token_embedding.weight.detach()
    openai_emb = torch.cat([emb[:49406], emb[text.SOT_ID:text.SOT_ID + 1], emb[text.EOT_ID:]])  # 49408 rows
    sd['token_embedding.weight'] = openai_emb
    sd['text_projection'] = model.encode_text.text_projection.weight.detach().T.clone()
    sd['logit_scale'] = torch.tensor(4.6052)
    torch.save(sd, tmp_path / 'openai.pt')
    loaded, preprocess = weights.load_model(tmp_path / 'openai.pt')
    assert loaded.kind == 'openai' and loaded.mean == weights.OPENAI_MEAN
    assert torch.equal(loaded.encode_text.token_embedding.weight[text.MASK_ID], torch.zeros(emb.shape[1]))
    _agree(model, loaded, data.tokenize(['a blue cross', 'x'], 24))
    from PIL import Image
    x = preprocess(Image.new('RGB', (90, 70), (255, 0, 0)))
    assert x.shape == (3, 64, 64)
    assert x[0, 0, 0].item() == pytest.approx((1 - weights.OPENAI_MEAN[0]) / weights.OPENAI_STD[0], rel=1e-5)


class _Evil:
    def __reduce__(self):
        return (os.system, ('echo owned',))


def test_checkpoint_needing_code_execution_is_refused(tmp_path):
    torch.save({'model': _Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(checkpoints.UnsafeCheckpoint, match='refused'):
        weights.load_model(tmp_path / 'evil.pt')


def test_zero_shot_eval_maps_rows_to_labels():
    """Classifier row k is label_ids[k]: non-contiguous labels are scored correctly."""
    class Fixed(torch.nn.Module):
        def encode_image(self, images):
            return images.float().mean(dim=(2, 3))        # the colour of each (constant) image

    classifier = torch.nn.functional.normalize(torch.eye(3), dim=-1)   # rows: red, green, blue
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    for i, c in enumerate([0, 1, 2, 0]):
        images[i, c] = 255
    labels = torch.tensor([7, 3, 9, 3])       # red=7, green=3, blue=9; the last one is wrong
    loader = [(images, labels, torch.arange(4))]
    m = evaluate.zero_shot_eval(Fixed(), loader, classifier, label_ids=[7, 3, 9], device='cpu',
                                mean=(0, 0, 0), std=(1, 1, 1), autocast=torch.autocast('cpu', enabled=False))
    assert m['zeroshot_top1'] == 75.0 and m['zeroshot_top5'] == 100.0 and m['images'] == 4


def test_a_skipped_step_changes_nothing_even_when_the_queue_wraps(monkeypatch):
    """train_step with a non-finite loss: parameters, AdamW state and every queue row stay as they
    were, also when the step's two pushes wrap around the end of the queue; the pointer moves.
    (BatchNorm running statistics are updated by the forward, before the loss is known.)"""
    from tools import bench
    cfg = demo.get_config('smoke')
    cfg.runtime.compile, cfg.loss.queue_size = 'false', 20          # batch 8: 8 EDA + 8 caption keys a step
    cpu = torch.device('cpu')
    state = trainstep.build_state(cfg, cpu)
    batch = bench._synthetic_batch(cfg, cfg.data.batch_size, cpu)
    nonfinite_at(monkeypatch, [False, True])   # the second step's loss is NaN
    assert float(trainstep.train_step(state, batch, cfg)['skipped']) == 0
    assert state.queue_ptr == 16
    before = {'queue': state.queue.clone(), 'model': {k: v.clone() for k, v in state.model.named_parameters()},
              'adam': [s['exp_avg'].clone() for s in state.optimizer.state.values()]}
    assert float(trainstep.train_step(state, batch, cfg)['skipped']) == 1
    assert state.queue_ptr == 8                             # 16 + 8 >= 20: restart at 0, then 0 + 8
    assert torch.equal(state.queue, before['queue'])
    assert all(torch.equal(v, before['model'][k]) for k, v in state.model.named_parameters())
    assert all(torch.equal(s['exp_avg'], a) for s, a in zip(state.optimizer.state.values(), before['adam']))
    assert int(state.nonfinite_total) == 1 and state.step == 2
