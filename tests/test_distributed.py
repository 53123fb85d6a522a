"""Several processes over gloo: 2 x batch 4 against 1 x batch 8 (loss and every gradient), HCCL's rules,
synchronised BatchNorm, micro-batches as more devices, an accumulating run killed and resumed, a dead rank.

The CLIP loss has no per-rank state, so world 2 must equal world 1 x batch 8 directly. The full
DeCLIP loss has per-rank state by design (BatchNorm statistics in the SimSiam heads, per-rank MLM
means and NN queues), so its world-1 twin evaluates the two ranks' forwards separately and
assembles the DeCLIP objective (mean over ranks of each rank's loss against all ranks'
features) from the tested component losses, with plain autograd instead of collectives.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import declip
import losses
import text
from fault_runs import command, overrides, run_and_kill
from helpers import ROOT, free_port, run, run_distributed, scalars, smoke_overrides, tiny_config

B, WORLD = 4, 2


def batch(declip_on):
    g = torch.Generator().manual_seed(0)
    n = B * WORLD
    images = torch.randn(n, 2 if declip_on else 1, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 5000, (n, 16), generator=g)
    tokens[:, 0] = text.SOT_ID
    for i in range(n):
        tokens[i, 6 + i % 5] = text.EOT_ID
        tokens[i, 7 + i % 5:] = 0
    eda = tokens.roll(1, dims=1)
    eda[:, 0] = text.SOT_ID
    masked, labels = text.mask_tokens(tokens, generator=g, prob=0.3)
    return images, tokens, masked, eda, labels


def local_inputs(rank, declip_on):
    images, tokens, masked, eda, labels = batch(declip_on)
    sl = slice(rank * B, (rank + 1) * B)
    lab = labels[sl].flatten()
    index = (lab != text.IGNORE_INDEX).nonzero().squeeze(1)
    if not declip_on:
        return dict(images=images[sl], text=tokens[sl]), None
    return dict(images=images[sl], text=masked[sl], text_eda=eda[sl], mlm_index=index), lab[index]


def make(declip_on):
    torch.manual_seed(0)
    cfg = tiny_config(declip=declip_on)
    return declip.build_model(cfg.model), cfg


def queue_of(rank, cfg):
    return losses.init_queue(cfg.loss.queue_size, cfg.model.embed_dim,
                             generator=torch.Generator().manual_seed(100 + rank))


def worker(rank, world, declip_on, path):
    """Rank `rank`'s loss (mean over ranks) and gradients, with the objective eager and, for DeCLIP,
    compiled as config.runtime.compile='step' compiles it (captured by dynamo, run by its plain
    backend: inductor's code aside; its graph breaks at the gathers, which run eager)."""
    torch.use_deterministic_algorithms(True)
    objectives, graphs = {'eager': losses.declip_loss}, []
    if declip_on:
        import trainstep
        compile_ = torch.compile
        torch.compile = lambda fn, **kw: compile_(fn, backend=lambda gm, _: graphs.append(gm) or gm.forward, **kw)
        objectives['compiled'] = trainstep.compiled(losses.declip_loss)
    results = {}
    for name, objective in objectives.items():
        model, cfg = make(declip_on)
        inputs, targets = local_inputs(rank, declip_on)
        ddp = DDP(model)   # held: its reducer averages the gradients in backward
        out = ddp(**inputs)
        total, terms, keys = objective(out, queue=queue_of(rank, cfg), mlm_targets=targets, weights=dict(cfg.loss))
        total.backward()
        value = total.detach().clone()
        torch.distributed.all_reduce(value)
        results[name] = {'loss': value / world, 'graphs': len(graphs),
                         'grads': {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    if rank == 0:
        torch.save(results, path)


def reference(declip_on):
    model, cfg = make(declip_on)
    w = dict(cfg.loss)
    if not declip_on:
        images, tokens, _, _, _ = batch(False)
        out = model(images, tokens)
        total = losses.declip_loss(out, queue=None, weights=w, rank=0, world_size=1)[0]
    else:
        per_rank = [local_inputs(r, True) for r in range(WORLD)]
        outs = [model(**inputs) for inputs, _ in per_rank]
        s = outs[0]['logit_scale']
        u = [[losses.normalize_image(v) for v in o['image']] for o in outs]
        t = [[losses.normalize_text(o['text']), losses.normalize_text(o['text_eda'])] for o in outs]
        all_u = [torch.cat([u[r][v] for r in range(WORLD)]) for v in range(2)]
        all_t = [torch.cat([t[r][c] for r in range(WORLD)]) for c in range(2)]
        nn = [torch.cat([losses.nn_lookup(queries=t[r][c].detach(), queue=queue_of(r, cfg)) for r in range(WORLD)])
              for c in range(2)]
        total = 0
        for r, (o, (_, targets)) in enumerate(zip(outs, per_rank)):
            labels = losses.contrastive_labels(B, r, 'cpu')
            total = total + (
                w['clip'] * losses.multiview_clip_loss(images=u[r], texts=t[r], all_images=all_u,
                                                       all_texts=all_t, logit_scale=s, labels=labels)
                + w['simsiam'] * losses.simsiam_loss(p=o['p'], z=o['z'])
                + w['mlm'] * losses.mlm_loss(logits=o['mlm_logits'], targets=targets)
                + w['nn'] * losses.nn_clip_loss(images=u[r], neighbours=nn, logit_scale=s, labels=labels)) / WORLD
    total.backward()
    return total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def check(declip_on, tmp_path):
    path = tmp_path / 'rank0.pt'
    run_distributed(worker, WORLD, declip_on, str(path))
    results = torch.load(path, weights_only=True)
    assert len(results) == 1 + declip_on
    assert results.get('compiled', {'graphs': 3})['graphs'] >= 3   # broken at the gathers (one graph: traced through)
    loss, grads = reference(declip_on)
    for got in results.values():
        torch.testing.assert_close(got['loss'], loss, rtol=1e-5, atol=1e-5)
        assert set(got['grads']) == set(grads) and len(grads) > 20
        for name in grads:
            torch.testing.assert_close(got['grads'][name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_clip_loss_world2_equals_world1(tmp_path):
    check(False, tmp_path)


def test_declip_loss_world2_equals_two_rank_emulation(tmp_path):
    check(True, tmp_path)


def _under_hccl_rules(out, script, args):
    return run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
                'tests/hccl_rules.py', str(out), script, *args])


def _same_sequence(out):
    seqs = [json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert seqs[0] == seqs[1]
    return seqs[0]


def test_two_process_training_and_evaluation_follow_hccl_rules(tmp_path, demo_dir):
    """Training with in-run evaluation, then evaluate.py, in 2 gloo processes with every
    collective checked against HCCL's dtypes: both finish and both ranks issue the same sequence."""
    work = tmp_path / 'run'
    res = _under_hccl_rules(tmp_path / 'train', 'train.py', [
        '--config', 'configs/demo.py:smoke', '--workdir', str(work), *smoke_overrides(demo_dir, log_every=2)])
    assert res.returncode == 0, res.stderr[-3000:]
    seq = _same_sequence(tmp_path / 'train')
    assert 'broadcast torch.float32 [4096, 128]' in seq                   # NN queues to rank 0, one at a time
    assert not [c for c in seq if c.startswith('gather ')]                # no gather: HCCL has none
    assert any(c.startswith('all_reduce torch.int64') for c in seq)      # bad-sample and eval counts
    assert 'zero-shot top-1' in res.stdout
    res = _under_hccl_rules(tmp_path / 'eval', 'evaluate.py', [
        '--ckpt', str(work / 'checkpoints' / 'last.pt'), '--prompts', 'prompt1', '--workers', '0'])
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(c.startswith('all_reduce torch.int64') for c in _same_sequence(tmp_path / 'eval'))


def test_hccl_rules_wrapper_refuses_float64(tmp_path):
    script = tmp_path / 'f64.py'
    script.write_text('import torch, torch.distributed as dist\n'
                      'dist.init_process_group("gloo")\n'
                      'dist.all_reduce(torch.ones(2, dtype=torch.int64))\n'
                      'dist.all_reduce(torch.ones(2, dtype=torch.float64))\n')
    res = _under_hccl_rules(tmp_path / 'out', str(script), [])
    assert res.returncode != 0 and 'dist.all_reduce with torch.float64' in res.stderr
    assert json.loads((tmp_path / 'out' / 'rank0.json').read_text()) == ['all_reduce torch.int64 [2]']


def _global_bn_rank(rank, world):
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(2 * 4, 3, 5, 5, generator=g) * 3 + 7
    w_full = torch.randn(2 * 4, 3, 5, 5, generator=g)
    ref = torch.nn.BatchNorm2d(3)
    bn = declip.GlobalBatchNorm2d(3)
    for _ in range(2):       # the second step also checks the shift by the updated running mean
        x_ref = x_full.clone().requires_grad_()
        y_ref = ref(x_ref)
        (y_ref * w_full).sum().backward()
        x = x_full[rank * 4:(rank + 1) * 4].clone().requires_grad_()
        y = bn(x)
        (y * w_full[rank * 4:(rank + 1) * 4]).sum().backward()
        torch.testing.assert_close(y, y_ref.detach()[rank * 4:(rank + 1) * 4], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, x_ref.grad[rank * 4:(rank + 1) * 4], rtol=1e-4, atol=1e-5)
        for p, q in ((bn.weight, ref.weight), (bn.bias, ref.bias)):
            total = p.grad.clone()
            torch.distributed.all_reduce(total)
            torch.testing.assert_close(total, q.grad, rtol=1e-5, atol=1e-5)
            p.grad = q.grad = None
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 2


def test_sync_batchnorm_uses_the_global_batch():
    """2 ranks x 4 images: outputs, input gradients, summed weight gradients and running statistics
    equal plain BatchNorm2d over all 8 images."""
    run_distributed(_global_bn_rank, 2)


ACCUM_JOBS = ((4, 1, 'host'), (2, 2, 'host'), (1, 4, 'device'))   # (processes, accum_steps, decode)


def _accum_config(variant, k, demo_dir, decode):
    from configs import clip_vitb32, demo
    cfg = (demo if variant == 'declip' else clip_vitb32).get_config('smoke')
    cfg.runtime.compile, cfg.accum_steps = 'false', k
    cfg.data.update(train_root=str(demo_dir / 'train'), train_meta=str(demo_dir / 'train.jsonl'), decode=decode)
    return cfg


def _three_steps(cfg, rank, world):
    """Three steps on the real loader: per step the terms of each of this process's virtual
    devices, the gradients the optimiser saw and the AdamW state it left. decode='device'
    decodes with Pillow standing in for nvjpeg."""
    import accum
    import train
    import trainstep
    import jpeg
    import loader
    state = trainstep.build_state(cfg, torch.device('cpu'), rank)
    train.wrap_ddp(state, cfg, world)
    batches = iter(loader.build_train_loader(cfg.data, rank=rank, world=world, start_step=0, max_iter=3,
                                             accum=cfg.accum_steps))
    seen = {'terms': [], 'tensors': []}
    real = trainstep.optimizer_step, accum.second_passes, jpeg.nvjpeg_decoder

    def step(st, skip):
        grads = {n: p.grad.clone() for n, p in st.model.named_parameters() if p.grad is not None}
        real[0](st, skip)
        kinds = {'grad': grads}
        for name, p in st.model.named_parameters():
            for kind, value in st.optimizer.state[p].items():
                kinds.setdefault(kind, {})[name] = value.clone()
        seen['tensors'].append(kinds)

    def several(*args, **kwargs):
        out = real[1](*args, **kwargs)
        seen['terms'].append(out[1])
        return out
    trainstep.optimizer_step, accum.second_passes = step, several
    jpeg.nvjpeg_decoder = lambda device: lambda blobs: [jpeg._pillow_decode(b, device) for b in blobs]
    train_step = accum.step_for(cfg)
    try:
        for _ in range(3):
            metrics = train_step(state, next(batches), cfg)
            if cfg.accum_steps == 1:   # one virtual device: the step's own losses
                seen['terms'].append([metrics['loss']])
    finally:
        trainstep.optimizer_step, accum.second_passes, jpeg.nvjpeg_decoder = real
    return seen


def _relative_errors(got, want):
    """{'kind name': |got - want| / |want|} over whole tensors of each kind (gradient, AdamW's
    exp_avg, ...), with |want| at least 1e-3 of the largest of its kind: the biases before a
    BatchNorm have a zero gradient but for round-off. 1 where the names differ."""
    errors = {}
    for kind in want.keys() | got.keys():
        a, b = got.get(kind, {}), want.get(kind, {})
        if a.keys() != b.keys():
            errors[f'{kind}: names differ, e.g. {sorted(a.keys() ^ b.keys())[:3]}'] = 1.0
            continue
        norms = {n: b[n].double().norm() for n in b}
        floor = 1e-3 * max(norms.values())
        errors.update({f'{kind} {n}': float((a[n].double() - b[n].double()).norm() / max(norms[n], floor))
                       for n in b})
    return errors


def _accum_jobs(rank, _, ports, demo_dir, out):
    """The jobs of ACCUM_JOBS one after another in the same processes (4, then 2, then 1 of them;
    the process group is rebuilt for each): every process saves its virtual devices' terms,
    process 0 keeps the 4-process job's gradients and AdamW state and saves how far the others'
    are from them."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    reference, errors = {}, {}
    for (world, k, decode), port in zip(ACCUM_JOBS, ports):
        if rank >= world:
            break
        if world > 1:
            dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
        for variant in ('declip', 'clip'):
            seen = _three_steps(_accum_config(variant, k, demo_dir, decode), rank, world)
            torch.save(seen.pop('terms'), out / f'{variant}_{world}x{k}_rank{rank}.pt')
            for t, tensors in enumerate(seen['tensors']) if rank == 0 else ():
                if (variant, t) not in reference:
                    reference[variant, t] = tensors
                else:
                    errors[variant, world, k, t] = _relative_errors(tensors, reference[variant, t])
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    if rank == 0:
        torch.save(errors, out / 'errors.pt')


def test_accumulated_micro_batches_equal_a_job_with_more_devices(tmp_path, demo_dir):
    """2 processes x accum_steps 2 and 1 process x 4 (JPEGs decoded in the step) against 4
    processes x 1, DeCLIP and the CLIP baseline, over three steps: the loss terms of every virtual
    device and every parameter gradient and AdamW state tensor, to fp32 round-off. Virtual device
    r*k+j is micro-batch j of process r: its loader, augmentation and masking streams, its NN
    queue, its contrastive labels (rows (r*k+j)*B ...; labels without the rank offset r*k*B
    fail the 2 x 2 job's virtual devices 2 and 3) and its BatchNorm statistics."""
    ports = [free_port() for _ in ACCUM_JOBS]
    torch.multiprocessing.start_processes(_accum_jobs, args=(None, ports, demo_dir, tmp_path), nprocs=4, join=True,
                                          start_method='spawn')
    errors = torch.load(tmp_path / 'errors.pt')
    assert sorted(errors) == sorted((v, w, k, t) for v in ('declip', 'clip') for w, k, _ in ACCUM_JOBS[1:]
                                    for t in range(3))
    for job, errs in errors.items():
        assert len(errs) > 4 * 40
        worst = max(errs, key=errs.get)
        assert errs[worst] < 5e-5, (job, worst, errs[worst])
    for variant, names in (('declip', {'total', 'clip', 'nn', 'simsiam', 'mlm'}), ('clip', {'total', 'clip'})):
        devices = [torch.load(tmp_path / f'{variant}_4x1_rank{r}.pt') for r in range(4)]
        want = [[d[t][0] for d in devices] for t in range(3)]
        for world, k, _ in ACCUM_JOBS[1:]:
            got = [torch.load(tmp_path / f'{variant}_{world}x{k}_rank{r}.pt') for r in range(world)]
            for t in range(3):
                per_device = [terms for ranks in got for terms in ranks[t]]
                assert len(per_device) == 4
                for v, (a, b) in enumerate(zip(per_device, want[t])):
                    assert a.keys() == b.keys() == names
                    for term in a:
                        torch.testing.assert_close(a[term], b[term], rtol=1e-5, atol=1e-6,
                                                   msg=f'{variant} {world}x{k} step {t} device {v}: {term}')


def test_accumulating_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, demo_dir, accumulating_run):
    """2 processes x accum_steps 2, SIGKILLed during step 3 (after step 2's checkpoint) and run
    again: it resumes at step 2, and the logged losses of all four steps and the last checkpoint
    (weights, AdamW state, the four virtual devices' NN queues and their pointer) are those of the
    uninterrupted run, so every virtual device's loader, augmentation and masking streams resume."""
    args = overrides(demo_dir, max_iter=4, accum_steps=2)
    (ref, _), crashed = accumulating_run, tmp_path / 'crashed'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    run_and_kill(crashed, args, 2, at_step=3)
    res = subprocess.run(command(crashed, args, 2), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'at step 2' in res.stderr
    want, got = scalars(ref, 'loss/total')[0], scalars(crashed, 'loss/total')[0]
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    a, b = (checkpoints.safe_load(run / 'checkpoints' / 'last.pt') for run in (crashed, ref))
    assert a['step'] == b['step'] == 4 and a['queue_ptr'] == b['queue_ptr'] and len(a['queues']) == 4
    for key in ('model', 'queues'):
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-8, msg=key)
    torch.testing.assert_close(a['optimizer']['state'], b['optimizer']['state'], rtol=1e-6, atol=1e-10)


def test_accumulation_with_synchronised_batchnorm_is_refused_in_one_line(tmp_path, demo_dir):
    """R50 (model.sync_bn=True) with accum_steps=2 on 2 processes: one line naming the setting to
    change and what it means, no traceback from train.py, no workdir."""
    work = tmp_path / 'run'
    res = run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()), 'train.py',
               '--config', 'configs/r50.py:smoke', '--workdir', str(work), *smoke_overrides(demo_dir),
               '--config.accum_steps=2'], timeout=120)
    assert res.returncode != 0 and not work.exists()
    lines = [line for line in (res.stdout + res.stderr).splitlines() if 'config.model.sync_bn' in line]
    assert len(lines) == 1 and 'Add --config.model.sync_bn=False' in lines[0] and 'own BatchNorm statistics' in lines[0]
    assert 'train.py", line' not in res.stderr


def test_a_dead_rank_does_not_hang_the_other(tmp_path, demo_dir):
    port = free_port()
    procs = []
    args = overrides(demo_dir, max_iter=400, **{'runtime.dist_timeout_s': 30})
    for rank in range(2):
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': '2',
               'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)}
        procs.append(subprocess.Popen([sys.executable, 'train.py', '--config', 'configs/demo.py:smoke',
                                       '--workdir', str(tmp_path), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for line in procs[0].stdout:
        if line.startswith('step 3/'):
            break
    procs[1].kill()
    start = time.time()
    try:
        code = procs[0].wait(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()
    assert code != 0 and time.time() - start < 120
