"""DeCLIP losses as pure functions of features and explicit state (the NN queue goes in and comes out).

Gradient accounting: features are gathered with gradient and DDP averages parameter gradients,
so no term is divided by the world size (the reference divides because its framework sums
gradients). Only torch is imported here.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def world_info():
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x):
    """All-gather along dim 0; the backward sums the incoming gradients over ranks."""
    if world_info()[1] == 1:
        return x
    return eager(_GatherWithGrad.apply, x)


def gather_no_grad(x):
    """All-gather along dim 0 of tensors that carry no gradient (the NN neighbours)."""
    world = world_info()[1]
    if world == 1:
        return x
    return eager(_all_gather, x, world)


def _all_gather(x, world):
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def eager(fn, *args):
    """fn(*args) outside torch.compile's graphs: a compiled objective breaks its graph at each
    collective, which runs eager. torch.compiler.disable is called only while compiling: it loads
    the compiler, which a run that compiles nothing should not pay for at start-up."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(fn)(*args)
    return fn(*args)


class _GatherWithGrad(torch.autograd.Function):
    """gather_no_grad whose backward is an all-reduce (sum) of the gathered gradient and this
    rank's rows of it. torch.distributed.nn's all_gather sends gradients back with all_to_all
    off NCCL: hcclAlltoAllV on Ascend, which the 910 runs only on whole 4-card clusters."""

    @staticmethod
    def forward(ctx, x):
        rank, n = world_info()[0], x.shape[0]
        ctx.rows = slice(rank * n, (rank + 1) * n)
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total[ctx.rows]


def upcast(x):
    """Losses are computed in at least fp32, whatever autocast produced."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def normalize_image(x):
    return x / x.norm(dim=-1, keepdim=True)


def normalize_text(x):
    """Text features get the reference's +1e-10 in the denominator (images do not)."""
    return x / (x.norm(dim=-1, keepdim=True) + 1e-10)


def contrastive_labels(batch, rank, device):
    """Row i of this rank's logits matches global column rank*B + i."""
    return rank * batch + torch.arange(batch, device=device)


def pair_loss(logits_a, logits_b, labels):
    """Reference ClipInfoCELoss: mean of the two cross-entropies."""
    return 0.5 * (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels))


def clip_loss(*, image, text, all_image, all_text, logit_scale, labels):
    """Symmetric CLIP loss of this rank's rows against all ranks' columns (normalised inputs)."""
    return pair_loss(logit_scale * image @ all_text.T, logit_scale * text @ all_image.T, labels)


def multiview_clip_loss(*, images, texts, all_images, all_texts, logit_scale, labels):
    """Mean of the pair loss over every (image view, text view) pair: 4 pairs for DeCLIP (MVS),
    1 for CLIP. One image->text matmul per image view against the concatenated text columns."""
    n = all_texts[0].shape[0]
    all_text_cols = torch.cat(all_texts, dim=0)
    total = 0.0
    for image, all_image in zip(images, all_images):
        i2t = (logit_scale * image @ all_text_cols.T).split(n, dim=1)
        for j, text in enumerate(texts):
            total = total + pair_loss(i2t[j], logit_scale * text @ all_image.T, labels)
    return total / (len(images) * len(texts))


def nn_lookup(*, queries, queue):
    """Top-1 cosine neighbour of each (unit-norm) query among the (unit-norm) queue rows."""
    return queue[(queries.to(queue.dtype) @ queue.T).argmax(dim=1)]


def nn_queue_push(*, queue, ptr, feats, skip=None):
    """The queue after a FIFO write of `feats` at `ptr`, and the new pointer (a new tensor: the
    given queue is not changed). The reference's overflow rule: when the write reaches or passes
    the end, fill to the end, drop the rest and restart at 0. Where `skip` (a 0-dim device
    tensor) is non-zero the rows keep their values, so a skipped step changes no row without a
    host sync; the pointer, a Python int that depends only on batch sizes, advances either way.
    Every shape depends only on the sizes, never on `ptr` (static shapes for Ascend's operator
    compile): one index_copy of n rows at ptr, ptr + 1, ... wrapped round to the start, where the
    dropped and skipped rows write back the rows they land on."""
    size, n = queue.shape[0], feats.shape[0]
    rows = feats[:size].to(queue.dtype)              # beyond one whole queue, rows are always dropped
    at = torch.arange(rows.shape[0], device=queue.device) + ptr
    keep = at >= size
    index = torch.where(keep, at - size, at)
    if skip is not None:
        keep = keep | (skip > 0)
    rows = torch.where(keep.unsqueeze(1), queue.index_select(0, index), rows)
    return queue.index_copy(0, index, rows), (0 if ptr + n >= size else ptr + n)


def nn_clip_loss(*, images, neighbours, logit_scale, labels):
    """Image -> nearest-neighbour-text only: per image view the pair loss of its logits against
    both neighbour sets (of the masked and of the EDA caption), averaged over views."""
    total = 0.0
    for image in images:
        logits = [logit_scale * image @ nn_feats.T for nn_feats in neighbours]
        total = total + pair_loss(logits[0], logits[1], labels)
    return total / len(images)


def simsiam_loss(*, p, z):
    """Negative cosine between each view's prediction and the other view's stopped projection."""
    return -0.5 * (F.cosine_similarity(p[0], z[1].detach(), dim=-1).mean()
                   + F.cosine_similarity(p[1], z[0].detach(), dim=-1).mean())


def mlm_loss(*, logits, targets):
    """Mean cross-entropy over the masked positions (a target of -100, cross_entropy's ignore
    index, is padding); 0, not NaN, when nothing is masked. Sum over count: no host sync."""
    total = F.cross_entropy(upcast(logits), targets, reduction='sum')
    return total / (targets >= 0).sum().clamp(min=1)


def nn_neighbours(keys, queue, dtype):
    """Each (unit-norm) key's top-1 neighbour in the queue, passed through the model dtype and
    re-normalised, as the reference does."""
    return normalize_text(upcast(nn_lookup(queries=keys, queue=queue).to(dtype)))


def unit_features(features):
    """(image views, caption views: the masked caption [, the EDA caption]) of a model output,
    unit-norm in at least fp32."""
    texts = [features['text']] + ([features['text_eda']] if 'text_eda' in features else [])
    return [normalize_image(upcast(f)) for f in features['image']], [normalize_text(upcast(t)) for t in texts]


def contrastive_terms(*, images, texts, all_images, all_texts, neighbours, logit_scale, labels, weights):
    """{'clip': MVS-CLIP, 'nn': NN loss} of one device's rows against every device's columns
    (normalised features; `neighbours` None without the NN term, else one set per caption view)."""
    terms = {}
    if weights.get('clip', 0):
        terms['clip'] = multiview_clip_loss(images=images, texts=texts, all_images=all_images,
                                            all_texts=all_texts, logit_scale=logit_scale, labels=labels)
    if neighbours is not None:
        neighbours = neighbours * 2 if len(neighbours) == 1 else neighbours
        terms['nn'] = nn_clip_loss(images=images, neighbours=neighbours, logit_scale=logit_scale, labels=labels)
    return terms


def device_terms(features, *, mlm_targets, weights):
    """{'simsiam': ..., 'mlm': ...}: the terms of one device's own batch (no other device's
    features), where weighted and present in the model's output."""
    terms = {}
    if weights.get('simsiam', 0) and 'p' in features:
        terms['simsiam'] = simsiam_loss(p=upcast(features['p']), z=upcast(features['z']))
    if weights.get('mlm', 0) and 'mlm_logits' in features:
        terms['mlm'] = mlm_loss(logits=features['mlm_logits'], targets=mlm_targets)
    return terms


def weighted_total(terms, weights):
    """The objective from its terms: sum of weight x value over the terms present. The one place
    terms are summed (declip_loss and the accumulation step both call it)."""
    return sum(weights[name] * value for name, value in terms.items())


def declip_loss(features, *, queue, mlm_targets=None, weights, rank=None, world_size=None):
    """Weighted DeCLIP objective: w_clip*MVS-CLIP + w_ss*SimSiam + w_mlm*MLM + w_nn*NN, i.e.
    weighted_total of contrastive_terms (against every device's features) and device_terms.

    `features` is the model's output dict; terms whose weight is 0 or whose features are absent are
    skipped (so the CLIP baseline is this function with one view, one caption and weights (1,0,0,0)).
    `queue` [Q, D] (unit-norm fp32) is this rank's NN memory as it was before this step; the
    neighbours are looked up in it. Returns (total, {term: detached value}, keys): `keys` are the
    caption features to push into the queue afterwards, in the reference's order (EDA caption
    first, then the masked caption; empty without the NN term), see nn_queue_push.
    """
    if rank is None or world_size is None:
        rank, world_size = world_info()
    s = upcast(features['logit_scale'])
    images, texts = unit_features(features)
    labels = contrastive_labels(texts[0].shape[0], rank, texts[0].device)
    all_images = [gather_with_grad(u) for u in images]
    all_texts = [gather_with_grad(t) for t in texts]

    keys = [t.detach() for t in texts] if weights.get('nn', 0) and queue is not None else []
    neighbours = [gather_no_grad(nn_neighbours(k, queue, features['text'].dtype)) for k in keys] or None
    terms = contrastive_terms(images=images, texts=texts, all_images=all_images, all_texts=all_texts,
                              neighbours=neighbours, logit_scale=s, labels=labels, weights=weights)
    terms.update(device_terms(features, mlm_targets=mlm_targets, weights=weights))
    keys = keys[::-1]
    return weighted_total(terms, weights), {name: value.detach() for name, value in terms.items()}, keys


def init_queue(size, dim, *, generator=None, device=None):
    """Random unit-norm rows, as the reference initialises its bank (N(0,1), L2-normalised)."""
    q = torch.randn(size, dim, generator=generator)
    return normalize_image(q).to(device)
