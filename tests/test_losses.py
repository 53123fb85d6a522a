"""Every loss term against a plain-loop float64 implementation of the reference's formulas."""
import math

import pytest
import torch

import losses

TOL = dict(rel=1e-6, abs=1e-6)


def ce(row, label):
    """-log softmax(row)[label] with plain Python loops."""
    m = max(row)
    return -(row[label] - m - math.log(sum(math.exp(v - m) for v in row)))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(v, eps=0.0):
    n = math.sqrt(dot(v, v))
    return [x / (n + eps) for x in v]


def brute_pair(img_rows, txt_cols, txt_rows, img_cols, s, offset):
    """Reference ClipInfoCELoss on lists of vectors."""
    a = sum(ce([s * dot(u, t) for t in txt_cols], offset + i) for i, u in enumerate(img_rows)) / len(img_rows)
    b = sum(ce([s * dot(t, u) for u in img_cols], offset + i) for i, t in enumerate(txt_rows)) / len(txt_rows)
    return 0.5 * (a + b)


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def L(x):
    return x.tolist()


@pytest.mark.parametrize('rank', [0, 2])
def test_clip_loss_with_rank_offset(rank):
    B, world, D, s = 3, 4, 5, 7.5
    all_u = losses.normalize_image(rand(B * world, D, seed=1))
    all_t = losses.normalize_text(rand(B * world, D, seed=2))
    u, t = all_u[rank * B:(rank + 1) * B], all_t[rank * B:(rank + 1) * B]
    labels = losses.contrastive_labels(B, rank, 'cpu')
    got = losses.clip_loss(image=u, text=t, all_image=all_u, all_text=all_t, logit_scale=s, labels=labels)
    want = brute_pair(L(u), L(all_t), L(t), L(all_u), s, rank * B)
    assert got.item() == pytest.approx(want, **TOL)


def test_multiview_clip_loss_four_pairs():
    B, D, s, rank, world = 4, 6, 11.0, 1, 2
    views = [losses.normalize_image(rand(B * world, D, seed=k)) for k in (3, 4)]
    caps = [losses.normalize_text(rand(B * world, D, seed=k)) for k in (5, 6)]
    sl = slice(rank * B, (rank + 1) * B)
    got = losses.multiview_clip_loss(images=[v[sl] for v in views], texts=[c[sl] for c in caps],
                                     all_images=views, all_texts=caps, logit_scale=s,
                                     labels=losses.contrastive_labels(B, rank, 'cpu'))
    want = sum(brute_pair(L(v[sl]), L(c), L(c[sl]), L(v), s, rank * B) for v in views for c in caps) / 4
    assert got.item() == pytest.approx(want, **TOL)


def test_nn_lookup_is_top1_cosine():
    queue = losses.normalize_image(rand(20, 4, seed=7)).float()
    q = losses.normalize_text(rand(5, 4, seed=8)).float()
    got = losses.nn_lookup(queries=q, queue=queue)
    for i in range(5):
        sims = [dot(L(q[i]), L(row)) for row in queue]
        assert torch.equal(got[i], queue[max(range(20), key=sims.__getitem__)])


def test_queue_push_fifo_and_overflow():
    queue = torch.zeros(10, 2)
    feats = torch.arange(8.).reshape(4, 2) + 1
    queue, ptr = losses.nn_queue_push(queue=queue, ptr=0, feats=feats)
    assert ptr == 4 and torch.equal(queue[:4], feats) and (queue[4:] == 0).all()
    queue, ptr = losses.nn_queue_push(queue=queue, ptr=ptr, feats=feats + 10)
    assert ptr == 8 and torch.equal(queue[4:8], feats + 10)
    # 8 + 4 >= 10: fill rows 8-9 with the first two, drop the other two, restart at 0
    queue, ptr = losses.nn_queue_push(queue=queue, ptr=ptr, feats=feats + 20)
    assert ptr == 0 and torch.equal(queue[8:], (feats + 20)[:2]) and torch.equal(queue[:4], feats)
    # exactly reaching the end also resets the pointer
    queue, ptr = losses.nn_queue_push(queue=torch.zeros(8, 2), ptr=4, feats=feats)
    assert ptr == 0 and torch.equal(queue[4:], feats)


def test_queue_push_is_pure_and_skip_keeps_every_row():
    """The given queue is never written; with skip set no row changes (also when the write wraps),
    while the pointer advances as for a normal step."""
    queue = torch.arange(20.).reshape(10, 2)
    before = queue.clone()
    feats = -torch.ones(4, 2)
    for ptr, want_ptr in ((2, 6), (8, 0), (6, 0)):   # inside, past the end, exactly to the end
        new, new_ptr = losses.nn_queue_push(queue=queue, ptr=ptr, feats=feats, skip=torch.tensor(1.0))
        assert new_ptr == want_ptr and torch.equal(new, before) and torch.equal(queue, before)
        new, _ = losses.nn_queue_push(queue=queue, ptr=ptr, feats=feats, skip=torch.tensor(0.0))
        end = min(ptr + 4, 10)
        assert torch.equal(new[ptr:end], feats[:end - ptr]) and torch.equal(queue, before)
        assert torch.equal(new[:ptr], before[:ptr]) and torch.equal(new[end:], before[end:])


def test_nn_clip_loss():
    B, D, s, rank, world = 3, 4, 9.0, 1, 2
    views = [losses.normalize_image(rand(B, D, seed=k)) for k in (9, 10)]
    nn = [losses.normalize_text(rand(B * world, D, seed=k)) for k in (11, 12)]
    got = losses.nn_clip_loss(images=views, neighbours=nn, logit_scale=s,
                              labels=losses.contrastive_labels(B, rank, 'cpu'))
    want = 0
    for v in views:  # l_k = 1/2 [CE(s u_k NN^T) + CE(s u_k NN'^T)], both image->text
        a = sum(ce([s * dot(u, t) for t in L(nn[0])], rank * B + i) for i, u in enumerate(L(v))) / B
        b = sum(ce([s * dot(u, t) for t in L(nn[1])], rank * B + i) for i, u in enumerate(L(v))) / B
        want += 0.5 * (a + b) / 2
    assert got.item() == pytest.approx(want, **TOL)


def test_simsiam_loss_and_stop_gradient():
    p = rand(2, 5, 6, seed=13).requires_grad_()
    z = rand(2, 5, 6, seed=14).requires_grad_()
    got = losses.simsiam_loss(p=p, z=z)
    cos = lambda a, b: dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))
    want = -0.5 * (sum(cos(a, b) for a, b in zip(L(p[0]), L(z[1]))) / 5
                   + sum(cos(a, b) for a, b in zip(L(p[1]), L(z[0]))) / 5)
    assert got.item() == pytest.approx(want, **TOL)
    got.backward()
    assert z.grad is None and p.grad.abs().sum() > 0


def test_mlm_loss_and_empty_batch():
    logits = rand(7, 11, seed=15)
    targets = torch.tensor([0, 3, 10, 5, 5, 1, 2])
    got = losses.mlm_loss(logits=logits, targets=targets)
    want = sum(ce(row, int(t)) for row, t in zip(L(logits), targets)) / 7
    assert got.item() == pytest.approx(want, **TOL)
    empty = losses.mlm_loss(logits=torch.zeros(0, 11, requires_grad=True), targets=torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and torch.isfinite(empty)
    empty.backward()


def test_declip_loss_combines_weighted_terms_and_updates_queue():
    B, D = 4, 6
    feats = {
        'image': rand(2, B, D, seed=20), 'text': rand(B, D, seed=21), 'text_eda': rand(B, D, seed=22),
        'z': rand(2, B, 8, seed=23), 'p': rand(2, B, 8, seed=24), 'mlm_logits': rand(5, 30, seed=25),
        'logit_scale': torch.tensor(14.0, dtype=torch.float64),
    }
    targets = torch.tensor([1, 2, 3, 4, 5])
    queue0 = losses.init_queue(10, D, generator=torch.Generator().manual_seed(0)).double()
    weights = dict(clip=0.4, simsiam=0.2, mlm=0.2, nn=0.2)
    total, terms, keys = losses.declip_loss(feats, queue=queue0.clone(), mlm_targets=targets,
                                            weights=weights, rank=0, world_size=1)
    queue, ptr = queue0, 0
    for k in keys:
        queue, ptr = losses.nn_queue_push(queue=queue, ptr=ptr, feats=k)
    u = [losses.normalize_image(f) for f in feats['image']]
    t = [losses.normalize_text(feats['text']), losses.normalize_text(feats['text_eda'])]
    lab = torch.arange(B)
    want = {
        'clip': losses.multiview_clip_loss(images=u, texts=t, all_images=u, all_texts=t, logit_scale=14.0, labels=lab),
        'simsiam': losses.simsiam_loss(p=feats['p'], z=feats['z']),
        'mlm': losses.mlm_loss(logits=feats['mlm_logits'], targets=targets),
        # neighbours from the queue as it was before this step
        'nn': losses.nn_clip_loss(images=u, neighbours=[losses.nn_lookup(queries=x, queue=queue0) for x in t],
                                  logit_scale=14.0, labels=lab),
    }
    for k in want:
        assert terms[k].item() == pytest.approx(want[k].item(), **TOL)
    assert total.item() == pytest.approx(sum(weights[k] * want[k].item() for k in want), **TOL)
    # EDA view enqueued first, then the masked caption
    assert ptr == 8
    assert torch.allclose(queue[:4], t[1]) and torch.allclose(queue[4:8], t[0])
    assert torch.equal(queue[8:], queue0[8:])
