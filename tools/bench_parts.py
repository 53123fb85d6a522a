"""`bench.py parts`: each speed choice of the training step against the form it replaced, forward +
backward (or the optimiser step) of that part alone, in one run."""
import copy
import math
import time
import types
from unittest import mock

import torch

import declip
import images
import losses
import runtime


def _timed_pairs(variants, device, rounds, inner=3):
    """Mean seconds per call of each (before, after) callable, the two alternating each round."""
    spent = {}
    for fn in [f for pair in variants.values() for f in pair]:
        fn()  # warm-up
    for _ in range(rounds):
        for name, pair in variants.items():
            for k, fn in enumerate(pair):
                runtime.synchronize(device)
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                runtime.synchronize(device)
                spent[name, k] = spent.get((name, k), 0.0) + (time.perf_counter() - start) / (rounds * inner)
    return {name: (spent[name, 0], spent[name, 1]) for name in variants}


def _math_attention(q, k, v, is_causal=False):
    """Attention as plain matmul + softmax (the implementation SDPA replaces)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float('-inf'))
    return scores.softmax(-1) @ v


def _pairwise_clip_loss(*, images, texts, all_images, all_texts, logit_scale, labels):
    """multiview_clip_loss with two matmuls per (image view, text view) pair."""
    total = 0.0
    for image, all_image in zip(images, all_images):
        for txt, all_text in zip(texts, all_texts):
            total = total + losses.pair_loss(logit_scale * image @ all_text.T, logit_scale * txt @ all_image.T, labels)
    return total / (len(images) * len(texts))


class _AutogradQuickGELU(torch.nn.Module):
    """QuickGELU as plain autograd (the form declip.QuickGELU replaces): keeps the sigmoid too."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def _activation_variants(p):
    """A text-tower MLP (Linear, QuickGELU, Linear) on a batch of caption tokens: QuickGELU keeping
    its input and its sigmoid for the backward, against its input alone (the sigmoid recomputed)."""
    if not isinstance(p.model.encode_text.transformer.resblocks[0].mlp.gelu, declip.QuickGELU):
        return {}
    mlp = copy.deepcopy(p.model.encode_text.transformer.resblocks[0].mlp)
    before = copy.deepcopy(mlp)
    before.gelu = _AutogradQuickGELU()
    x = torch.randn(p.batch, p.cfg.model.context_length, p.cfg.model.text_width, generator=p.g).to(p.device)
    return {'QuickGELU backward: keeps its sigmoid -> recomputes it': (
        p.fwd_bwd(lambda: before(x), before), p.fwd_bwd(lambda: mlp(x), mlp))}


def _view_variants(p):
    """Image tower: both views in one forward and the patch embedding (ViT); channels-last ResNet (CUDA only)."""
    m, model = p.cfg.model, p.model
    views = torch.randn(p.batch, p.cfg.data.views, 3, m.image_size, m.image_size, generator=p.g).to(p.device)
    out = {}
    if m.vision == 'vit' and p.cfg.data.views > 1:
        out['image views: one forward per view -> one forward of all views'] = (
            p.fwd_bwd(lambda: torch.stack([model.visual(views[:, v]) for v in range(views.shape[1])])),
            p.fwd_bwd(lambda: model.encode_views(views)))
    if m.vision == 'vit':
        conv, first = copy.deepcopy(model.visual.conv1).requires_grad_(), views[:, 0]
        out['patch embedding: strided convolution -> patch matmul'] = (
            p.fwd_bwd(lambda: conv(first), conv), p.fwd_bwd(lambda: declip.patch_embed(first, conv.weight), conv))
    if m.vision == 'resnet' and p.device.type == 'cuda':  # channels-last is used on CUDA only
        visual_cl = copy.deepcopy(model.visual).to(memory_format=torch.channels_last)
        first_cl = views[:, 0].contiguous(memory_format=torch.channels_last)
        out['ResNet: NCHW -> channels_last'] = (
            p.fwd_bwd(lambda: model.visual(views[:, 0])), p.fwd_bwd(lambda: visual_cl(first_cl), visual_cl))
    return out


def _text_variants(p):
    """Text tower attention: SDPA against matmul + softmax."""
    def math_text_tower():
        with mock.patch.object(torch.nn.functional, 'scaled_dot_product_attention', _math_attention):
            return p.model.encode_text(p.inputs['text'])
    return {'text tower attention: matmul + softmax -> SDPA': (
        p.fwd_bwd(math_text_tower), p.fwd_bwd(lambda: p.model.encode_text(p.inputs['text'])))}


def _mlm_variants(p):
    """MLM head on the masked positions only, against all positions (DeCLIP only)."""
    m = p.cfg.model
    if not m.declip:
        return {}
    words = torch.randn(p.batch, m.context_length, m.text_width, generator=p.g).to(p.device).requires_grad_()
    index = p.inputs['mlm_index']
    targets = torch.randint(0, m.vocab_size, (index.numel(),), generator=p.g).to(p.device)
    head = p.model.text_label_predictor
    return {'MLM head: all positions -> masked positions only': (
        p.fwd_bwd(lambda: losses.mlm_loss(logits=head(words).flatten(0, 1)[index], targets=targets)),
        p.fwd_bwd(lambda: losses.mlm_loss(logits=head(words.flatten(0, 1)[index]), targets=targets)))}


def _clip_variants(p):
    """CLIP logits: one matmul per image view against all captions, against two per pair."""
    views, eda = p.cfg.data.views, int(p.cfg.data.eda)
    feats = [losses.normalize_image(torch.randn(p.batch, p.cfg.model.embed_dim, generator=p.g).to(p.device))
             .requires_grad_() for _ in range(views + eda)]
    image, caption = feats[:views], feats[views:] or feats[:1]
    args = dict(images=image, texts=caption, all_images=image, all_texts=caption,
                logit_scale=torch.tensor(14.3, device=p.device), labels=torch.arange(p.batch, device=p.device))
    return {'CLIP logits: 2 matmuls per pair -> 1 per image view + 1 per pair': (
        p.fwd_bwd(lambda: _pairwise_clip_loss(**args)), p.fwd_bwd(lambda: losses.multiview_clip_loss(**args)))}


def _colour_variants(p):
    """Colour ops on each op's samples only, against every op on the whole batch."""
    size = p.cfg.model.image_size
    uint8_views = torch.randint(0, 256, (p.batch * p.cfg.data.views, 3, size, size), generator=p.g).to(
        p.device, torch.uint8)

    def augment(static):
        return lambda: images.device_augment(uint8_views, generator=torch.Generator().manual_seed(0), static=static)
    return {'colour ops: every op on the whole batch (torch.where) -> each op on its samples': (
        augment(True), augment(False))}


def _adamw_variants(p):
    """AdamW fused against its per-tensor loop, on copies of the parameters with fixed gradients."""
    params = [q.detach().clone().requires_grad_() for q in p.model.parameters() if q.requires_grad]
    for q in params:  # copies: the forward/backward parts reset the model's gradients
        q.grad = torch.randn_like(q) * 1e-3
    opts = [torch.optim.AdamW(params, lr=1e-6, foreach=False), torch.optim.AdamW(params, lr=1e-6, fused=True)]
    return {'AdamW: per-tensor loop -> fused': (opts[0].step, opts[1].step)}


def _fwd_bwd(fn, module, autocast):
    """A callable running forward (under autocast) + backward of fn, then clearing the gradients."""
    def run():
        with autocast:
            out = fn()
        out.float().sum().backward()
        module.zero_grad(set_to_none=True)
    return run


def bench_parts(args, *, cfg, device, inputs):
    """Each speed choice of the step against the form it replaced, forward + backward (or the
    optimiser step) of that part alone, in one run: ms before, ms after, ratio. `inputs`: a
    synthetic batch of the config (bench._synthetic_batch) on `device`."""
    _, autocast, _ = runtime.precision(args.precision, device.type)
    torch.manual_seed(0)
    model = declip.build_model(cfg.model).to(device)
    p = types.SimpleNamespace(cfg=cfg, model=model, device=device, batch=args.batch,
                              g=torch.Generator().manual_seed(0), inputs=inputs,
                              fwd_bwd=lambda fn, module=model: _fwd_bwd(fn, module, autocast))
    families = (_view_variants, _text_variants, _activation_variants, _mlm_variants, _clip_variants, _colour_variants,
                _adamw_variants)
    variants = {name: pair for family in families for name, pair in family(p).items()}
    times = _timed_pairs(variants, device, args.rounds)
    result = {'config': args.config, 'batch': args.batch, 'device': str(device), 'precision': args.precision,
              'parts': {name: {'before_ms': t0 * 1000, 'after_ms': t1 * 1000, 'speedup': t0 / t1}
                        for name, (t0, t1) in times.items()}}
    rows = [(name, f'{t0 * 1000:.2f} ms', f'{t1 * 1000:.2f} ms', f'{t0 / t1:.2f}x') for name, (t0, t1) in times.items()]
    return rows, result
