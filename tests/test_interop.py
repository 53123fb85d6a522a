"""Weights in and out: starting a run from our, reference or OpenAI weights (load_weights), export to
open_clip's layout, and inference on one's own images and texts."""
import json

import ml_collections
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoints
import data
import declip
import images
import text
import weights
from configs import demo, r50
from helpers import run


def _tiny(vision='vit', seed=1, act='quick_gelu'):
    """A small model (context length 24) with a trained-looking, non-zero text projection bias."""
    cfg = (r50 if vision == 'resnet' else demo).get_config('smoke')
    cfg.model.act = act
    torch.manual_seed(seed)
    model = declip.build_model(cfg.model).eval()
    with torch.no_grad():
        model.encode_text.text_projection.bias.normal_()
        for m in model.modules():   # BatchNorm statistics that are not the identity
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    return model, cfg


def _save_ours(model, cfg, path):
    checkpoints.save_checkpoint(path, {'model': model.state_dict(), 'config': cfg.to_dict(), 'step': 3})
    return path


def _save_reference(model, path):
    sd = {f'module.{k}': v for k, v in model.state_dict().items()}
    sd['module.logit_scale'] = sd['module.logit_scale'].reshape([])
    torch.save({'model': sd, 'optimizer': {}, 'last_iter': 10}, path)
    return path


def _save_openai(model, path):
    """OpenAI CLIP's layout by hand: text tower at the top level, 49,408 token rows, a bias-free
    text_projection matrix (the model's bias is zeroed first), a scalar logit scale."""
    with torch.no_grad():
        model.encode_text.text_projection.bias.zero_()
    sd = {k: v for k, v in model.state_dict().items() if k.startswith('visual.')}
    for k, v in model.encode_text.state_dict().items():
        if not k.startswith(('token_embedding', 'text_projection')):
            sd[k] = v
    emb = model.encode_text.token_embedding.weight.detach()
    sd['token_embedding.weight'] = torch.cat([emb[:49406], emb[text.SOT_ID:text.SOT_ID + 1], emb[text.EOT_ID:]])
    sd['text_projection'] = model.encode_text.text_projection.weight.detach().T.clone()
    sd['logit_scale'] = model.logit_scale.detach().reshape([])
    torch.save(sd, path)
    return path


def _features(model, ids):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, model.cfg.image_size, model.cfg.image_size)
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids)


def _same_features(a, b, ids, tol=1e-6):
    for x, y in zip(_features(a, ids), _features(b, ids)):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


IDS = data.tokenize(['a red circle on a blue square', 'x'], 24)
HEADS = {'projector.', 'predictor.', 'text_label_predictor.'}


# ---------------------------------------------------------------- load_weights: a new run from a file

@pytest.mark.parametrize('kind', ['ours', 'reference', 'openai'])
def test_load_weights_in_a_fresh_model_equals_load_model(tmp_path, kind):
    model, cfg = _tiny()
    path = {'ours': lambda: _save_ours(model, cfg, tmp_path / 'last.pt'),
            'reference': lambda: _save_reference(model, tmp_path / 'ckpt.pth.tar'),
            'openai': lambda: _save_openai(model, tmp_path / 'openai.pt')}[kind]()
    sd, model_cfg = weights.load_weights(path)
    assert all(k.startswith(('visual.', 'encode_text.', 'logit_scale', *HEADS)) for k in sd)
    assert sd['logit_scale'].shape == (1,)
    if kind == 'ours':
        assert model_cfg.to_dict() == cfg.model.to_dict()
    assert (model_cfg.context_length, model_cfg.vocab_size, model_cfg.embed_dim) == (24, text.VOCAB_SIZE, 128)
    assert model_cfg.declip == (kind != 'openai')   # no heads in the file: a CLIP model
    torch.manual_seed(7)                       # a new DeCLIP run's model, other random weights
    fresh = declip.build_model(cfg.model).eval()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected
    assert {k.split('.')[0] + '.' for k in missing} == (HEADS if kind == 'openai' else set())
    loaded = weights.load_model(path)[0]
    assert loaded.kind == kind
    _same_features(fresh, loaded, IDS, tol=0)
    _same_features(fresh, model, IDS, tol=1e-5)
    if kind == 'openai':
        assert torch.equal(sd['encode_text.token_embedding.weight'][text.MASK_ID], torch.zeros(128))
        assert torch.equal(sd['encode_text.text_projection.bias'], torch.zeros(128))


def test_load_weights_names_a_missing_or_misshapen_tower_tensor(tmp_path):
    model, cfg = _tiny()
    sd = model.state_dict()
    del sd['encode_text.ln_final.weight']
    sd['visual.ln_post.bias'] = torch.zeros(3)
    path = tmp_path / 'broken.pt'
    checkpoints.save_checkpoint(path, {'model': sd, 'config': cfg.to_dict(), 'step': 3})
    with pytest.raises(RuntimeError, match=rf"{path}: missing keys \['encode_text.ln_final.weight'\].*"
                                           r"visual.ln_post.bias \(3,\), expected \(128,\)"):
        weights.load_weights(path)
    del sd['encode_text.token_embedding.weight']
    torch.save(sd, path)
    with pytest.raises(ValueError, match=rf"{path}: no 'encode_text.token_embedding.weight'"):
        weights.load_weights(path)


# ---------------------------------------------------------------- export to open_clip's layout

def _open_clip_ids(ids):
    """DeCLIP ids -> OpenAI's (and open_clip's tokenizer's): sot/eot one lower, no <|mask|>."""
    return torch.where(ids >= text.SOT_ID, ids - 1, ids)


@pytest.mark.parametrize('vision', ['vit', 'resnet'])
def test_export_is_openai_layout_and_loads_back_to_the_same_features(tmp_path, vision):
    model, cfg = _tiny(vision)
    sd, config = weights.to_open_clip(model)
    ours = model.state_dict()
    text_keys = {k[len('encode_text.'):] for k in ours if k.startswith('encode_text.')}
    assert set(sd) == {k for k in ours if k.startswith('visual.')} | text_keys | {'logit_scale'}
    assert {'text_projection.weight', 'text_projection.bias', 'ln_final.weight', 'positional_embedding',
            'transformer.resblocks.0.attn.in_proj_weight'} <= set(sd)
    assert sd['logit_scale'].shape == () and sd['token_embedding.weight'].shape == (49408, 128)
    # the exported rows, indexed by OpenAI's ids, are the model's rows at DeCLIP's ids
    assert torch.equal(sd['token_embedding.weight'][_open_clip_ids(IDS)], model.encode_text.token_embedding(IDS))
    assert config['model_cfg']['text_cfg'] == dict(context_length=24, vocab_size=49408, width=128, heads=2,
                                                   layers=3, proj_bias=True)
    vision_cfg = config['model_cfg']['vision_cfg']
    heads = vision_cfg['width'] * (32 if vision == 'resnet' else 1) // vision_cfg['head_width']
    assert heads == cfg.model.vision_heads and config['model_cfg']['quick_gelu'] is True
    assert config['preprocess_cfg']['mean'] == list(images.IMAGENET_MEAN)
    path, _ = weights.export_open_clip(model, tmp_path / 'export')
    loaded, preprocess = weights.load_model(path)   # our OpenAI loader, mean/std from the config
    assert loaded.kind == 'openai' and loaded.mean == images.IMAGENET_MEAN
    _same_features(loaded, model, IDS, tol=0)
    assert loaded.logit_scale.item() == model.logit_scale.item()


def test_export_cli_writes_open_clip_folder_and_evaluates_nothing(tmp_path):
    model, cfg = _tiny()
    ckpt = _save_ours(model, cfg, tmp_path / 'last.pt')
    res = run(['evaluate.py', '--ckpt', str(ckpt), '--export', str(tmp_path / 'out')], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['open_clip_config.json',
                                                                    'open_clip_pytorch_model.bin']
    assert not list(tmp_path.glob('*.json'))          # no metrics written
    config = json.loads((tmp_path / 'out' / 'open_clip_config.json').read_text())
    assert config == json.loads(json.dumps(weights.to_open_clip(model)[1]))
    _same_features(weights.load_model(tmp_path / 'out' / 'open_clip_pytorch_model.bin')[0], model, IDS, tol=0)


def test_evaluation_precision_defaults_to_fp32():
    res = run(['evaluate.py', '--helpfull'], timeout=120)
    block = res.stdout[res.stdout.index('--precision'):]
    assert "<fp32|bf16|fp16|auto>" in block.splitlines()[0] and "(default: 'fp32')" in block[:400]


def test_open_clip_activation_comes_from_its_config(tmp_path):
    """An open_clip folder says its activation (GELU unless quick_gelu): a GELU model loads into
    GELU towers, with its features exactly; in QuickGELU towers they would be off."""
    model, _ = _tiny(act='gelu')
    path, config = weights.export_open_clip(model, tmp_path)
    assert json.loads(config.read_text())['model_cfg']['quick_gelu'] is False
    loaded = weights.load_model(path)[0]
    assert loaded.cfg.act == 'gelu'
    _same_features(loaded, model, IDS, tol=0)
    quick = declip.build_model(ml_collections.ConfigDict({**loaded.cfg, 'act': 'quick_gelu'})).eval()
    quick.load_state_dict(loaded.state_dict())
    for got, want in zip(_features(quick, IDS), _features(model, IDS)):   # ~0.6 % here
        assert (got - want).norm() > 1e-3 * want.norm()
    with pytest.raises(ValueError, match=rf'{path}: its towers use gelu, not quick_gelu'):
        weights.load_weights(path, act='quick_gelu')          # a run whose config.model.act says otherwise
    config.write_text('{"model_cfg": ')
    with pytest.raises(ValueError, match=rf'{config}: not an open_clip config'):
        weights.load_model(path)


def test_a_bare_state_dict_is_never_given_an_activation_silently(tmp_path, capsys):
    """No config beside an OpenAI-layout state dict: QuickGELU (OpenAI's) with a warning, or the
    activation asked for (a LAION GELU model: act='gelu'); our checkpoints say theirs."""
    model, cfg = _tiny(act='gelu')
    path = _save_openai(model, tmp_path / 'laion.pt')
    assert weights.load_model(path)[0].cfg.act == 'quick_gelu'
    assert f'{path} does not say which activation its towers use' in capsys.readouterr().out
    loaded = weights.load_model(path, act='gelu')[0]
    assert loaded.cfg.act == 'gelu' and 'taking gelu' in capsys.readouterr().out
    _same_features(loaded, model, IDS, tol=1e-6)
    ours = _save_ours(model, cfg, tmp_path / 'last.pt')
    assert weights.load_model(ours)[0].cfg.act == 'gelu' and capsys.readouterr().out == ''
    with pytest.raises(ValueError, match=rf'{ours}: its towers use gelu, not quick_gelu'):
        weights.load_weights(ours, act='quick_gelu')


def test_open_clip_builds_the_export_and_computes_the_same_features(tmp_path):
    """Where open_clip is installed (it is not a dependency): its own model from the folder."""
    open_clip = pytest.importorskip('open_clip')
    model, _ = _tiny()
    weights.export_open_clip(model, tmp_path)
    theirs = open_clip.create_model(f'local-dir:{tmp_path}').eval()
    assert open_clip.get_tokenizer(f'local-dir:{tmp_path}')(['a red circle on a blue square']).shape == (1, 24)
    ids = _open_clip_ids(IDS)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = theirs.encode_image(pixels), theirs.encode_text(ids)
    for x, y in zip(got, _features(model, IDS)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- inference on one's own data

def test_predict_on_own_images_and_texts(tmp_path):
    model, cfg = _tiny()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)              # exp(5) = 148: the scale used is capped at 100
    ckpt = _save_ours(model, cfg, tmp_path / 'last.pt')
    texts = ['a red circle', 'a green square', 'a blue triangle on a white background']
    # the README's lines
    model, preprocess = weights.load_model(ckpt)
    pixels = torch.stack([preprocess(Image.new('RGB', (90, 70), c)) for c in ('red', 'green')])
    image_emb, text_emb, probs = weights.predict(model, pixels, texts)

    ids = model.tokenize(texts)
    assert ids.shape == (3, 24) and torch.equal(ids, data.tokenize(texts, 24))
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(2)) and torch.allclose(text_emb.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(ids)
    cos = (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T
    by_hand = (100 * cos).exp() / (100 * cos).exp().sum(dim=1, keepdim=True)
    torch.testing.assert_close(probs, by_hand, rtol=1e-5, atol=1e-6)
    assert probs.shape == (2, 3) and not torch.allclose(probs, F.softmax(cos, dim=1))
