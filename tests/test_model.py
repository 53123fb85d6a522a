"""State-dict layout against the reference's key lists, parameter counts, conv1 freeze, features, eot pooling."""
import math

import pytest
import torch

import data
import declip
import text
from configs import r50, vitb32
from helpers import SMOKE, tiny_config, tiny_model


def meta_model(cfg):
    with torch.device('meta'):
        return declip.build_model(cfg.model)


def block_keys(prefix, width, mlp=4):
    shapes = {'attn.in_proj_weight': [3 * width, width], 'attn.in_proj_bias': [3 * width],
              'attn.out_proj.weight': [width, width], 'attn.out_proj.bias': [width],
              'ln_1.weight': [width], 'ln_1.bias': [width],
              'mlp.c_fc.weight': [mlp * width, width], 'mlp.c_fc.bias': [mlp * width],
              'mlp.c_proj.weight': [width, mlp * width], 'mlp.c_proj.bias': [width],
              'ln_2.weight': [width], 'ln_2.bias': [width]}
    return {f'{prefix}.{k}': v for k, v in shapes.items()}


def bn(prefix, n, d1=False):
    return {f'{prefix}.weight': [n], f'{prefix}.bias': [n], f'{prefix}.running_mean': [n],
            f'{prefix}.running_var': [n], f'{prefix}.num_batches_tracked': []}


def text_and_heads(embed):
    keys = {'logit_scale': [1], 'encode_text.token_embedding.weight': [49409, 512],
            'encode_text.positional_embedding': [77, 512],
            'encode_text.ln_final.weight': [512], 'encode_text.ln_final.bias': [512],
            'encode_text.text_projection.weight': [embed, 512], 'encode_text.text_projection.bias': [embed],
            'projector.linear1.weight': [1024, embed], 'projector.linear1.bias': [1024],
            'projector.linear2.weight': [1024, 1024], 'projector.linear2.bias': [1024],
            'projector.linear3.weight': [1024, 1024], 'projector.linear3.bias': [1024],
            'predictor.linear1.weight': [512, 1024], 'predictor.linear1.bias': [512],
            'predictor.layer2.weight': [1024, 512], 'predictor.layer2.bias': [1024],
            'text_label_predictor.weight': [49409, 512], 'text_label_predictor.bias': [49409]}
    for i in range(12):
        keys.update(block_keys(f'encode_text.transformer.resblocks.{i}', 512))
    for name, n in [('projector.bn1', 1024), ('projector.bn2', 1024), ('projector.bn3', 1024), ('predictor.bn1', 512)]:
        keys.update(bn(name, n))
    return keys


def expected_vitb32():
    keys = text_and_heads(512)
    keys.update({'visual.conv1.weight': [768, 3, 32, 32], 'visual.class_embedding': [768],
                 'visual.positional_embedding': [50, 768], 'visual.ln_pre.weight': [768],
                 'visual.ln_pre.bias': [768], 'visual.ln_post.weight': [768], 'visual.ln_post.bias': [768],
                 'visual.proj': [768, 512]})
    for i in range(12):
        keys.update(block_keys(f'visual.transformer.resblocks.{i}', 768))
    return keys


def expected_r50():
    keys = text_and_heads(1024)
    for i, (cin, cout) in enumerate([(3, 32), (32, 32), (32, 64)], start=1):
        keys[f'visual.conv{i}.weight'] = [cout, cin, 3, 3]
        keys.update(bn(f'visual.bn{i}', cout))
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f'visual.layer{stage}.{b}'
            keys[f'{p}.conv1.weight'] = [planes, inplanes, 1, 1]
            keys[f'{p}.conv2.weight'] = [planes, planes, 3, 3]
            keys[f'{p}.conv3.weight'] = [planes * 4, planes, 1, 1]
            keys.update(bn(f'{p}.bn1', planes)); keys.update(bn(f'{p}.bn2', planes)); keys.update(bn(f'{p}.bn3', planes * 4))
            if b == 0:
                keys[f'{p}.downsample.0.weight'] = [planes * 4, inplanes, 1, 1]
                keys.update(bn(f'{p}.downsample.1', planes * 4))
            inplanes = planes * 4
    keys['visual.attnpool.positional_embedding'] = [50, 2048]
    for name, out in [('q_proj', 2048), ('k_proj', 2048), ('v_proj', 2048), ('c_proj', 1024)]:
        keys[f'visual.attnpool.{name}.weight'] = [out, 2048]
        keys[f'visual.attnpool.{name}.bias'] = [out]
    return keys


@pytest.mark.parametrize('config, expected', [(vitb32, expected_vitb32), (r50, expected_r50)])
def test_state_dict_matches_spec(config, expected):
    sd = meta_model(config.get_config()).state_dict()
    got = {k: list(v.shape) for k, v in sd.items()}
    want = expected()
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts():
    vit = meta_model(vitb32.get_config())
    assert count(vit.visual) == 87_849_216
    assert count(vit.encode_text) == 63_429_120
    assert count(vit.projector) == 2_630_656 and count(vit.predictor) == 1_051_136
    assert count(vit.text_label_predictor) == 25_346_817
    res = meta_model(r50.get_config())
    assert count(res.visual) == 38_316_896          # OpenAI RN50 visual (reference minus unused fc)
    assert count(res.encode_text) == 63_691_776 and count(res.projector) == 3_154_944


@pytest.mark.parametrize('freeze', [True, False])
def test_conv1_freeze(freeze):
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.model.freeze_conv1 = freeze
    model = declip.build_model(cfg.model)
    before = model.visual.conv1.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2)
    images = torch.randn(4, 2, 3, 32, 32)
    text = torch.randint(0, 1000, (4, 16))
    text[:, 5] = 49408
    out = model(images, text)
    (out['image'].sum() + out['text'].sum() + out['p'].sum()).backward()
    opt.step()
    assert torch.equal(before, model.visual.conv1.weight) == freeze


def test_patch_embedding_is_the_strided_convolution():
    """declip.patch_embed (one matmul over flattened patches) against conv1 as OpenAI CLIP runs it,
    values and gradients in fp32, at ViT-B/32's sizes."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 768, kernel_size=32, stride=32, bias=False)
    images = torch.randn(2, 3, 224, 224, generator=g, requires_grad=True)
    want = conv(images).flatten(2).transpose(1, 2)
    got = declip.patch_embed(images, conv.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    up = torch.randn(want.shape, generator=g)
    want_grads = torch.autograd.grad((want * up).sum(), (images, conv.weight))
    got_grads = torch.autograd.grad((got * up).sum(), (images, conv.weight))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_features_and_apis_agree():
    torch.manual_seed(0)
    model = declip.build_model(tiny_config().model).eval()
    images = torch.randn(3, 2, 3, 32, 32)
    text = torch.randint(0, 1000, (3, 16))
    text[:, 6] = 49408
    out = model(images, text, text_eda=text, mlm_index=torch.tensor([1, 17, 40]))
    torch.testing.assert_close(out['image'][1], model.encode_image(images[:, 1]), rtol=1e-5, atol=1e-5)
    emb, words = model.encode_text(text, return_tokens=True)
    torch.testing.assert_close(out['text'], emb)
    torch.testing.assert_close(out['text_eda'], emb)
    flat = words.reshape(-1, words.shape[-1])[[1, 17, 40]]
    torch.testing.assert_close(out['mlm_logits'], model.text_label_predictor(flat))
    assert out['logit_scale'].item() == pytest.approx(1 / 0.07, rel=1e-6)
    # causal: tokens after the eot do not change the embedding
    text2 = text.clone(); text2[:, 10:] = 7
    torch.testing.assert_close(model.encode_text(text2), emb)


def test_logit_scale_clamp_and_cap():
    model = declip.build_model(tiny_config().model)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 3.0
    with torch.no_grad():
        model.logit_scale.fill_(5.5)
    out = model(torch.randn(2, 2, 3, 32, 32), torch.randint(0, 9, (2, 16)))
    assert out['logit_scale'].item() == 100.0
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 6.0


def test_resnet_views_use_per_view_batchnorm():
    torch.manual_seed(0)
    model = declip.build_model(tiny_config('resnet').model).train()
    images = torch.randn(4, 2, 3, 32, 32)
    feats = model.encode_views(images)
    for v in range(2):
        torch.testing.assert_close(feats[v], model.encode_image(images[:, v]), rtol=1e-5, atol=1e-5)


def test_logit_scale_value_is_capped_but_its_gradient_is_that_of_exp():
    """The reference overwrites exp(theta)'s value with min(., 100) through .data: the forward
    sees 100 and theta still gets d/dtheta of 2 * exp(theta) = 2 e^5 at theta = 5."""
    theta = torch.tensor([5.0], requires_grad=True)
    s = declip.capped_scale(theta)
    (2 * s).sum().backward()
    assert s.item() == 100.0
    torch.testing.assert_close(theta.grad, torch.tensor([2 * math.exp(5.0)]), rtol=1e-6, atol=0)
    theta = torch.tensor([2.0], requires_grad=True)
    s = declip.capped_scale(theta)
    s.sum().backward()
    torch.testing.assert_close(s.detach(), torch.tensor([math.exp(2.0)]))
    torch.testing.assert_close(theta.grad, torch.tensor([math.exp(2.0)]))


def test_first_forward_uses_the_initial_logit_scale_then_it_is_clamped():
    """As the reference: theta = ln(1/0.07) in the first forward, clamped into [3, 6] after the
    forward (before backward) and after the step."""
    from tools import bench
    import trainstep
    from configs import demo
    cfg = demo.get_config('smoke')
    cfg.runtime.compile = 'false'
    state = trainstep.build_state(cfg, torch.device('cpu'))
    seen = []
    state.model.register_forward_hook(lambda m, args, out: seen.append(out['logit_scale'].item()))
    batch = bench._synthetic_batch(cfg, 8, torch.device('cpu'))
    for _ in range(2):
        trainstep.train_step(state, batch, cfg)
    assert seen[0] == pytest.approx(1 / 0.07, rel=1e-6) and seen[1] >= math.exp(3.0) * (1 - 1e-6)
    assert 3.0 <= state.model.logit_scale.item() <= 6.0


@pytest.mark.parametrize('vision', ['vit', 'resnet'])
def test_gradient_checkpointing_changes_no_gradient_and_no_running_statistic(vision):
    """The same DeCLIP forward/backward with every transformer block and ResNet stage recomputed, or
    the image tower's first one only: equal features, parameter gradients and BatchNorm running
    statistics; the recomputed units (and only they) start their forward twice."""
    from losses import declip_loss
    cfg = tiny_config(vision)
    cfg.model.sync_bn = False
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 2, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 1000, (4, 16), generator=g)
    results = []
    for every, first in ((False, 0), (True, 0), (False, 1)):
        cfg.model.grad_checkpointing, cfg.model.checkpoint_image_stages = every, first
        torch.manual_seed(0)
        model = declip.build_model(cfg.model)
        image_units = ([model.visual.layer1, model.visual.layer2] if vision == 'resnet'
                       else list(model.visual.transformer.resblocks[:2]))
        units = image_units + [model.encode_text.transformer.resblocks[0]]
        calls = [0] * len(units)
        for k, unit in enumerate(units):
            unit.register_forward_pre_hook(lambda m, a, k=k: calls.__setitem__(k, calls[k] + 1))   # a recompute
            # stops early, before the forward hooks
        out = model(images, tokens, text_eda=tokens.roll(1, 0), mlm_index=torch.tensor([1, 17, 40]))
        total, _, _ = declip_loss(out, queue=None, mlm_targets=torch.tensor([5, 6, 7]),
                                  weights=dict(clip=0.4, simsiam=0.2, mlm=0.2, nn=0.0))
        total.backward()
        passes = 1 + (vision == 'resnet' and not cfg.model.concat_views)   # a ResNet sees each view apart
        assert calls == [passes * (1 + (every or first > 0)), passes * (1 + every), 2 * (1 + every)], (every, first)
        results.append(({k: p.grad for k, p in model.named_parameters() if p.grad is not None},
                        {k: b.clone() for k, b in model.named_buffers()}, total.detach()))
    (g0, b0, t0), *others = results
    for g1, b1, t1 in others:
        torch.testing.assert_close(t1, t0, rtol=0, atol=0)
        assert g0.keys() == g1.keys()
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
        for k in b0:
            torch.testing.assert_close(b1[k], b0[k], rtol=0, atol=0, msg=k)


def test_text_embedding_is_read_at_the_eot_position():
    """The text embedding is text_projection(ln_final features) at the eot: tokens after it change nothing."""
    model = tiny_model()
    tokens = data.tokenize(['a red circle on a grey background', 'look at this cross!'], SMOKE.model.context_length)
    eot = (tokens == text.EOT_ID).int().argmax(dim=1)
    assert (eot < tokens.shape[1] - 2).all()
    before, after = tokens.clone(), tokens.clone()
    before[:, 2] = 320
    after[torch.arange(2), eot + 1] = 320
    with torch.no_grad():
        emb, feats = model.encode_text(tokens, return_tokens=True)
        manual = model.encode_text.text_projection(feats[torch.arange(2), eot])
        torch.testing.assert_close(emb, manual, rtol=0, atol=1e-6)
        assert ((model.encode_text(before) - emb).abs().amax(dim=1) > 1e-3).all()
        torch.testing.assert_close(model.encode_text(after), emb, rtol=0, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_quick_gelu_keeps_only_its_input_and_gives_autograds_gradient(dtype):
    """QuickGELU's output and gradient are autograd's for x * sigmoid(1.702 x) bit for bit, while
    the backward keeps x alone (autograd keeps the sigmoid too: one more hidden-size tensor)."""
    x, grad = (torch.randn(64, 96, generator=torch.Generator().manual_seed(s)).mul(4).to(dtype) for s in (0, 1))
    kept = {}
    for name, fn in (('autograd', lambda t: t * torch.sigmoid(1.702 * t)), ('QuickGELU', declip.QuickGELU())):
        leaf = x.clone().requires_grad_()
        storages = set()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: storages.add(t.untyped_storage().data_ptr()) or t,
                                                      lambda t: t):
            y = fn(leaf)
        y.backward(grad)
        kept[name] = (y.detach(), leaf.grad, storages - {leaf.untyped_storage().data_ptr()})
    assert torch.equal(kept['QuickGELU'][0], kept['autograd'][0])
    assert torch.equal(kept['QuickGELU'][1], kept['autograd'][1])
    assert len(kept['autograd'][2]) == 1 and kept['QuickGELU'][2] == set()   # the sigmoid, kept by autograd only
