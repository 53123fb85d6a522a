"""Gradient accumulation as its own training step: config.accum_steps = k micro-batches a step,
computed exactly as the k virtual devices rank*k + j of a k x world job would (GradCache), so the
contrastive terms see every micro-batch's features while only one micro-batch's activations are
held at a time. The loop runs this train_step when accum_steps > 1, trainstep.train_step otherwise (step_for);
both end in trainstep.update and sum the objective's terms with losses.weighted_total."""
import contextlib

import torch
import torch.distributed as dist

import jpeg
import losses
import trainstep


def micro_batches(batch, k):
    """The k micro-batches of a loader batch built with accum=k: rows split in k equal parts, the
    flat MLM positions of each part re-based to its own rows (host tensors, no device sync)."""
    n, length = len(batch['text']) // k, batch['text'].shape[1]
    parts = []
    for j in range(k):
        part = {key: batch[key][j * n:(j + 1) * n] for key in ('images', 'text', 'text_eda') if key in batch}
        if 'mlm_index' in batch:
            lo, hi = torch.searchsorted(batch['mlm_index'], torch.tensor([j, j + 1]) * n * length).tolist()
            part['mlm_index'] = batch['mlm_index'][lo:hi] - j * n * length
            part['mlm_targets'] = batch['mlm_targets'][lo:hi]
        parts.append(part)
    return parts


def step_for(cfg):
    """The step the loop runs (tools/bench.py times the same): trainstep.train_step, or this
    module's for accum_steps > 1; with data.decode='device' a batch's JPEGs are decoded on the
    device first (all k micro-batches' at once: an image nothing decodes borrows from all k x B)."""
    step = train_step if cfg.accum_steps > 1 else trainstep.train_step
    if cfg.data.decode != 'device':
        return step
    return lambda state, batch, cfg: step(state, jpeg.decoded(batch, size=cfg.data.image_size, device=state.device),
                                          cfg)


def train_step(state, batch, cfg):
    """trainstep.train_step for k = accum_steps micro-batches, the same result dict; its losses
    are those of virtual device rank * k (as rank 0's are logged in a larger job).
    1. forward every micro-batch without gradient; 2. each local virtual device's contrastive
    terms against every virtual device's features, backward to the features; 3. forward each
    micro-batch again with gradient and back-propagate features . their gradient plus its own
    device terms."""
    rank, world = losses.world_info()
    k = cfg.accum_steps
    trainstep.set_learning_rate(state, cfg)
    parts = [trainstep.step_inputs(state, part, cfg=cfg, rank=rank * k + j, world=world * k)
             for j, part in enumerate(micro_batches(batch, k))]
    contrastive, grads, keys = feature_gradients(state, parts, cfg=cfg, rank=rank, world=world)
    total, per_part = second_passes(state, parts, contrastive, grads, cfg=cfg, rank=rank)
    metrics = trainstep.update(state, batch, total=total, keys=keys)
    return dict(metrics, loss=per_part[0], views=parts[0]['views'].detach())


def cached_features(state, parts):
    """Each part's model output without gradient (the MLM head not run), BatchNorm buffers as
    they were before."""
    buffers = [b.clone() for b in state.model.buffers()]
    with torch.no_grad(), state.autocast:
        cached = [state.model(p['views'], p['text'], text_eda=p['text_eda']) for p in parts]
    for b, saved in zip(state.model.buffers(), buffers):
        b.copy_(saved)
    return cached


def feature_gradients(state, parts, *, cfg, rank, world):
    """Steps 1-2: the unit features of every virtual device gathered (as leaves), each local
    device's contrastive terms against all of them, backward, the feature gradients summed over
    ranks. Returns (each part's contrastive terms, (gradient of each gathered feature view, None
    where no term uses it; gradient of the logit scale, None without contrastive terms), each
    part's queue keys in push order)."""
    k, weights = len(parts), trainstep.loss_weights(cfg)
    cached = cached_features(state, parts)
    n, dtype = parts[0]['text'].shape[0], cached[0]['text'].dtype
    local = [losses.unit_features(out) for out in cached]
    gathered = [losses.gather_no_grad(torch.cat(views)).requires_grad_()
                for views in zip(*[imgs + txts for imgs, txts in local])]
    all_images, all_texts = gathered[:len(local[0][0])], gathered[len(local[0][0]):]
    s = losses.upcast(cached[0]['logit_scale']).detach().requires_grad_()
    keys = [[t.detach() for t in txts] if state.queue is not None else [] for _, txts in local]
    neighbours = None
    if state.queue is not None:   # per caption view, every virtual device's neighbours
        per_view = zip(*[[losses.nn_neighbours(key, q, dtype) for key in ks] for ks, q in zip(keys, state.queue)])
        neighbours = [losses.gather_no_grad(torch.cat(v)) for v in per_view]
    contrastive = []
    for j in range(k):
        device = rank * k + j
        rows = slice(device * n, (device + 1) * n)
        contrastive.append(trainstep.as_run(state, losses.contrastive_terms)(
            images=[a[rows] for a in all_images], texts=[a[rows] for a in all_texts], all_images=all_images,
            all_texts=all_texts, neighbours=neighbours, logit_scale=s, weights=weights,
            labels=device * n + torch.arange(n, device=s.device)))
    total = sum(losses.weighted_total(terms, weights) for terms in contrastive)
    if torch.is_tensor(total):   # else no contrastive term is weighted: nothing to pass back
        total.backward()
    grads = [a.grad for a in gathered]
    for g in grads if world > 1 else ():
        if g is not None:   # the same views on every rank (the same weights)
            dist.all_reduce(g)
    return contrastive, (grads, s.grad), [ks[::-1] for ks in keys]


def second_passes(state, parts, contrastive, grads, *, cfg, rank):
    """Step 3: each part forwarded again with gradient; backward of its surrogate plus its own
    device_terms, scaled 1/k so that DDP's mean over ranks is the mean over virtual devices (DDP
    reduces only in the last part's backward). BatchNorm running statistics end as virtual device
    rank*k's update, as rank 0's in DDP. Returns (total over parts, each part's {'total', term})."""
    k, weights = len(parts), trainstep.loss_weights(cfg)
    n = parts[0]['text'].shape[0]
    feature_grads, scale_grad = grads
    total, per_part, kept = 0.0, [], None
    for j, p in enumerate(parts):
        rows = slice((rank * k + j) * n, (rank * k + j + 1) * n)
        quiet = state.ddp is not None and j < k - 1
        with state.ddp.no_sync() if quiet else contextlib.nullcontext():
            with state.autocast:
                out = state.forward(p['views'], p['text'], text_eda=p['text_eda'], mlm_index=p['mlm_index'])
            if j == 0:
                kept = [b.clone() for b in state.model.buffers()]
            own_grads = [g if g is None else g[rows] for g in feature_grads]
            surrogate = trainstep.as_run(state, surrogate_loss)(out, own_grads, scale_grad if j == k - 1 else None)
            own = trainstep.as_run(state, losses.device_terms)(out, mlm_targets=p['mlm_targets'], weights=weights)
            state.scaler.scale((surrogate + losses.weighted_total(own, weights)) / k).backward()
        terms = dict(contrastive[j], **own)
        part = losses.weighted_total(terms, weights).detach()
        total = total + part
        per_part.append({'total': part, **{t: v.detach() for t, v in terms.items()}})
    with torch.no_grad():
        for b, saved in zip(state.model.buffers(), kept):
            b.copy_(saved)
    return total, per_part


def surrogate_loss(out, feature_grads, scale_grad=None):
    """sum of this part's unit features . their gradient (its rows of the gathered ones' gradient,
    None where no term uses a view), plus logit scale . its gradient where given (with the last
    part: DDP's backward must reach every parameter): its gradient is the contrastive terms'
    gradient through this part's forward."""
    imgs, txts = losses.unit_features(out)
    surrogate = sum((f * g).sum() for f, g in zip(imgs + txts, feature_grads) if g is not None)
    if scale_grad is not None:
        surrogate = surrogate + (losses.upcast(out['logit_scale']) * scale_grad).sum()
    return surrogate
