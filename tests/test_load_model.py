"""weights.load_model: the reference's .pth.tar, OpenAI state dicts, and files it refuses or names as no checkpoint."""
import os

import pytest
import torch

import checkpoints
import data
import declip
import text
import weights
from configs import demo, r50


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


@pytest.mark.parametrize('obj', [torch.zeros(3), [torch.zeros(3)], {1: torch.zeros(3)},
                                 {'model': torch.zeros(3), 'config': {}, 'step': 1}])
def test_checkpoint_that_is_not_a_state_dict_names_file_and_expectation(tmp_path, obj):
    path = tmp_path / 'odd.pt'
    torch.save(obj, path)
    with pytest.raises(ValueError, match=rf'{path}: expected a dict: a checkpoint of ours'):
        weights.load_model(path)


@pytest.mark.parametrize('content', [b'epoch 3: loss 0.25\n', bytes(range(256)) * 4, b'PK\x03\x04 not a zip'])
def test_a_file_that_is_no_checkpoint_is_named_so(tmp_path, content):
    """A text file, random bytes, a broken zip: "not a checkpoint", not "needs code execution"."""
    path = tmp_path / 'notes.pt'
    path.write_bytes(content)
    with pytest.raises(RuntimeError, match=rf'{path}: not a checkpoint \(torch.load cannot read it') as e:
        weights.load_model(path)
    assert not isinstance(e.value, checkpoints.UnsafeCheckpoint) and 'code execution' not in str(e.value)
