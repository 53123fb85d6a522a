"""DeCLIP / CLIP model: ModifiedResNet-50 or ViT image tower, causal text Transformer, SimSiam and MLM heads.

State-dict names follow OpenAI CLIP for `visual.*` and the DeCLIP reference for `encode_text.*`,
`projector.*`, `predictor.*` and `text_label_predictor.*`, so released weights load unchanged.
The model returns features; the losses live in losses.py.
"""
import contextlib
import math
from collections import OrderedDict

import ml_collections
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

import text

# The two image towers of the DeCLIP paper (OpenAI CLIP's ViT-B/32 and RN50).
ViT_B32 = dict(vision='vit', embed_dim=512, image_size=224, patch_size=32, vision_width=768,
               vision_layers=12, vision_heads=12)
R50 = dict(vision='resnet', embed_dim=1024, image_size=224, patch_size=32, vision_width=64,
           vision_layers=(3, 4, 6, 3), vision_heads=32)


def model_config(vision, *, declip=True, **overrides):
    """A config's `model` block: the image tower `vision` (ViT_B32, R50 or a variant), CLIP's
    text tower (77 tokens, DeCLIP's 49,409 ids, width 512, 12 layers) and, with `declip`, the
    SimSiam heads (1024 / 512) and the MLM head; the ViT patch embedding frozen (reference quirk);
    the ResNet's BatchNorm synchronised over the job (the reference's DeCLIP-R50 config asks for it;
    its CLIP-R50 config does not, and configs/clip_r50.py turns it off); the Transformers' MLP
    activation `act`: 'quick_gelu' (OpenAI CLIP, DeCLIP) or 'gelu' (most open_clip models trained by
    LAION). Memory for time: `grad_checkpointing` recomputes every block and stage of both towers in
    the backward, `checkpoint_image_stages` = N the first N stages (ResNet) or blocks (ViT) of the
    image tower only: a ResNet's early stages hold the most activations for the fewest FLOPs."""
    fields = dict(vision, freeze_conv1=True, concat_views=False, sync_bn=vision['vision'] == 'resnet',
                  grad_checkpointing=False, checkpoint_image_stages=0, act='quick_gelu',
                  context_length=text.CONTEXT_LENGTH,
                  vocab_size=text.VOCAB_SIZE, text_width=512, text_layers=12, text_heads=8, declip=declip,
                  simsiam_dim=1024, predictor_dim=512)
    return ml_collections.ConfigDict({**fields, **overrides})


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), keeping only x for the backward: autograd would also keep the sigmoid,
    a second hidden-size tensor per MLP (a fifth of an eager ViT-B/32 step's saved activations;
    compiled code already kept x alone)."""

    def forward(self, x):
        return _QuickGELU.apply(x)


class _QuickGELU(torch.autograd.Function):
    """The gradient autograd computes for x * sigmoid(1.702 x), op for op, the sigmoid recomputed."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * s + torch.ops.aten.sigmoid_backward(grad * x, s) * 1.702


ACTIVATIONS = {'quick_gelu': QuickGELU, 'gelu': nn.GELU}


def activation(name):
    """The MLP activation module class of config.model.act."""
    if name not in ACTIVATIONS:
        raise ValueError(f'config.model.act: one of {", ".join(ACTIVATIONS)}, got {name!r}')
    return ACTIVATIONS[name]


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, on SDPA kernels."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False):
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = rearrange(qkv, 'b n (three h d) -> three b h n d', three=3, h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(rearrange(x, 'b h n d -> b n (h d)'))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + MHA(LN(x)), x + MLP(LN(x)); MLP with QuickGELU (or `act`)."""

    def __init__(self, width, heads, act=QuickGELU):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=act(), c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


@contextlib.contextmanager
def _frozen_norm_statistics(module):
    """BatchNorm layers of `module` that normalise as usual but leave their running statistics."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def checkpointed(module, x, **kwargs):
    """module(x) whose activations are recomputed in the backward instead of kept (memory for
    time); the recompute does not update BatchNorm running statistics a second time."""
    return torch.utils.checkpoint.checkpoint(
        module, x, use_reentrant=False, **kwargs,
        context_fn=lambda: (contextlib.nullcontext(), _frozen_norm_statistics(module)))


def recomputed(tower, i):
    """Whether block or stage i of `tower` recomputes its activations in this backward: all with
    grad_checkpointing, the first checkpoint_first otherwise (build_model sets both)."""
    return torch.is_grad_enabled() and (tower.grad_checkpointing or i < tower.checkpoint_first)


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, act=QuickGELU):
        super().__init__()
        self.grad_checkpointing, self.checkpoint_first = False, 0
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, act) for _ in range(layers))
        # CLIP's text-tower init; the DeCLIP reference applies it to the visual ViT too.
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x, causal=False):
        for i, block in enumerate(self.resblocks):
            x = checkpointed(block, x, causal=causal) if recomputed(self, i) else block(x, causal=causal)
        return x


def patch_embed(images, weight):
    """[B, 3, H, W] -> [B, patches, width]: conv1 (stride = kernel, no bias) as one matmul over the
    flattened non-overlapping patches: the same sums as the convolution, whose strided kernel took
    4.2 ms of a 148 ms ViT-B/32 step (512 views at 224 px) on an H200."""
    p = weight.shape[-1]
    patches = rearrange(images, 'b c (h p) (w q) -> b (h w) (c p q)', p=p, q=p)
    return patches @ rearrange(weight, 'd c p q -> (c p q) d')


class VisionTransformer(nn.Module):
    """ViT with OpenAI CLIP names; conv1 (patch embedding) optionally frozen at its random init."""

    def __init__(self, *, image_size, patch_size, width, layers, heads, embed_dim, freeze_conv1, act=QuickGELU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(0.01 * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        # Reference quirk: the patch embedding is never trained (conv1 has no BN/dropout, so
        # its train/eval mode is irrelevant; only requires_grad matters).
        self.conv1.weight.requires_grad_(not freeze_conv1)

    def forward(self, x):
        x = patch_embed(x, self.conv1.weight)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose gradient is the all_reduce(SUM) of the incoming gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole job's batch (SyncBN): the
    per-channel sums of x and x^2 are all-reduced with autograd (any backend: gloo, nccl, hccl),
    in fp32 and shifted by the running mean (the same on every rank) against cancellation.
    In evaluation or a single process it is plain BatchNorm2d; state-dict names are unchanged."""

    def forward(self, x):
        dist = torch.distributed
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        shift = self.running_mean.detach().view(1, c, 1, 1)
        d = x.float() - shift
        count = torch.full((1,), x.numel() / c, device=x.device)
        sums = SumOverRanks.apply(torch.cat([d.sum((0, 2, 3)), (d * d).sum((0, 2, 3)), count]))
        n = sums[-1]
        mean_d = sums[:c] / n
        var = sums[c:2 * c] / n - mean_d * mean_d
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean_d + self.running_mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        y = (d - mean_d.view(1, c, 1, 1)) * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        return (y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)).to(x.dtype)


class Bottleneck(nn.Module):
    """ModifiedResNet bottleneck: anti-aliased (avg-pool) strided convolution, OpenAI names."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([
                ('-1', nn.AvgPool2d(stride)),
                ('0', nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                ('1', nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the spatial-mean token attends to itself and all positions."""

    def __init__(self, spatial, dim, heads, out_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial ** 2 + 1, dim) / dim ** 0.5)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)
        self.heads = heads
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(layer.weight, std=dim ** -0.5)

    def forward(self, x):
        x = rearrange(x, 'b c h w -> b (h w) c')
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        # Only the first (mean) token's output is used, so only its query is computed.
        q = rearrange(self.q_proj(x[:, :1]), 'b n (h d) -> b h n d', h=self.heads)
        k = rearrange(self.k_proj(x), 'b n (h d) -> b h n d', h=self.heads)
        v = rearrange(self.v_proj(x), 'b n (h d) -> b h n d', h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(rearrange(out, 'b h 1 d -> b (h d)'))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem + avg-pool, anti-aliased strides, attention pooling.

    The reference also builds an unused `fc` (used only off 7x7 feature maps); it is not built
    here and the checkpoint loader ignores it.
    """

    def __init__(self, *, layers, width, heads, image_size, embed_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * 4
            stage += [Bottleneck(inplanes, planes, 1) for _ in range(1, blocks)]
            setattr(self, f'layer{i + 1}', nn.Sequential(*stage))
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, embed_dim)
        for name, param in self.named_parameters():
            if name.endswith('bn3.weight') and name.startswith('layer'):
                nn.init.zeros_(param)
        self.num_stages, self.grad_checkpointing, self.checkpoint_first = len(layers), False, 0

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        for i in range(self.num_stages):
            stage = getattr(self, f'layer{i + 1}')
            x = checkpointed(stage, x) if recomputed(self, i) else stage(x)
        return self.attnpool(x)


class TextTransformer(nn.Module):
    """Causal text Transformer pooled at the eot (largest id) position; projection with bias."""

    def __init__(self, *, vocab_size, context_length, width, layers, heads, embed_dim, act=QuickGELU):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection.weight, std=width ** -0.5)

    def forward(self, tokens, return_tokens=False):
        """Un-normalised embedding [B, embed_dim]; with return_tokens also ln_final features [B, L, width]."""
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        out = self.text_projection(pooled)
        return (out, x) if return_tokens else out


class ProjectionMLP(nn.Module):
    """SimSiam projector: (Linear-BN-ReLU) x2, Linear-BN; reference names linear1..3 / bn1..3."""

    def __init__(self, in_dim, hidden_dim, out_dim):
        super().__init__()
        self.linear1, self.bn1 = nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim)
        self.linear2, self.bn2 = nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim)
        self.linear3, self.bn3 = nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(out_dim)

    def forward(self, x):
        x = F.relu(self.bn1(self.linear1(x)))
        x = F.relu(self.bn2(self.linear2(x)))
        return self.bn3(self.linear3(x))


class PredictionMLP(nn.Module):
    """SimSiam predictor: Linear-BN-ReLU, Linear; reference names linear1, bn1, layer2."""

    def __init__(self, in_dim, hidden_dim, out_dim):
        super().__init__()
        self.linear1, self.bn1 = nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim)
        self.layer2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        return self.layer2(F.relu(self.bn1(self.linear1(x))))


def capped_scale(theta, cap=100.0):
    """exp(theta) with its value capped at `cap` and the gradient of the uncapped exp(theta), as
    the reference (which overwrites the value's .data): theta above ln(cap) still learns, and can
    come back down, where exp().clamp() would give it no gradient at all."""
    scale = theta.exp()
    return scale - (scale - scale.clamp(max=cap)).detach()


class DeCLIP(nn.Module):
    """CLIP towers plus, when `declip` is on, the SimSiam projector/predictor and the MLM head."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.logit_scale = nn.Parameter(torch.full([1], math.log(1 / 0.07)))
        act = activation(cfg.get('act', 'quick_gelu'))   # checkpoints from before model.act: QuickGELU
        if cfg.vision == 'vit':
            self.visual = VisionTransformer(
                image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                layers=cfg.vision_layers, heads=cfg.vision_heads, embed_dim=cfg.embed_dim,
                freeze_conv1=cfg.freeze_conv1, act=act)
        elif cfg.vision == 'resnet':
            self.visual = ModifiedResNet(
                layers=tuple(cfg.vision_layers), width=cfg.vision_width, heads=cfg.vision_heads,
                image_size=cfg.image_size, embed_dim=cfg.embed_dim)
        else:
            raise ValueError(f'model.vision must be "vit" or "resnet", got {cfg.vision!r}')
        # Named `encode_text` (reference state-dict prefix); calling it is the text-encoding API.
        self.encode_text = TextTransformer(
            vocab_size=cfg.vocab_size, context_length=cfg.context_length, width=cfg.text_width,
            layers=cfg.text_layers, heads=cfg.text_heads, embed_dim=cfg.embed_dim, act=act)
        if cfg.declip:
            self.projector = ProjectionMLP(cfg.embed_dim, cfg.simsiam_dim, cfg.simsiam_dim)
            self.predictor = PredictionMLP(cfg.simsiam_dim, cfg.predictor_dim, cfg.simsiam_dim)
            self.text_label_predictor = nn.Linear(cfg.text_width, cfg.vocab_size)

    def encode_image(self, images):
        """Un-normalised image embedding [B, embed_dim]."""
        return self.visual(images)

    def clamp_logit_scale_(self, low=3.0, high=6.0):
        """Reference `logit_scale_param_value` clip: the parameter itself is kept in [low, high]."""
        with torch.no_grad():
            self.logit_scale.clamp_(low, high)

    def encode_views(self, images):
        """[B, V, 3, H, W] -> [V, B, D]. One forward for all views unless BatchNorm needs per-view
        statistics (ResNet, as the reference's 'split' forward) and concat_views is off."""
        views = images.shape[1]
        if self.cfg.vision == 'resnet' and not self.cfg.concat_views:
            return torch.stack([self.visual(images[:, v]) for v in range(views)])
        feats = self.visual(rearrange(images, 'b v c h w -> (v b) c h w'))
        return rearrange(feats, '(v b) d -> v b d', v=views)

    def forward(self, images, text, text_eda=None, mlm_index=None):
        """Features for one training step (no losses).

        images [B, V, 3, H, W] normalised views; text [B, L] (the masked caption for DeCLIP);
        text_eda [B, L] optional second caption view; mlm_index [M] flat positions of masked
        tokens in `text` (computed on the host so that no device sync is needed).
        """
        image = self.encode_views(images)
        out = {'image': image, 'logit_scale': capped_scale(self.logit_scale)}
        if self.cfg.declip and mlm_index is not None:
            out['text'], words = self.encode_text(text, return_tokens=True)
            words = rearrange(words, 'b l w -> (b l) w').index_select(0, mlm_index)
            out['mlm_logits'] = self.text_label_predictor(words)
        else:
            out['text'] = self.encode_text(text)
        if text_eda is not None:
            out['text_eda'] = self.encode_text(text_eda)
        if self.cfg.declip:
            out['z'] = torch.stack([self.projector(f) for f in image])
            out['p'] = torch.stack([self.predictor(z) for z in out['z']])
        return out


def build_model(model_config):
    """DeCLIP (or, with model.declip False, the CLIP baseline) from a config's `model` block."""
    model = DeCLIP(model_config)
    for tower in model.modules():
        if isinstance(tower, (Transformer, ModifiedResNet)):
            tower.grad_checkpointing = model_config.get('grad_checkpointing', False)
    image_tower = model.visual if model_config.vision == 'resnet' else model.visual.transformer
    image_tower.checkpoint_first = model_config.get('checkpoint_image_stages', 0)
    if model_config.get('sync_bn', False):
        for m in model.visual.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = GlobalBatchNorm2d
    return model
