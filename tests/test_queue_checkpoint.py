"""The NN queues in a checkpoint: every rank's queues reach rank 0 one [Q, D] row at a time
(broadcast from each rank in turn; no gather, which HCCL lacks and torch_npu turns into an
all_gather of every rank's queues on every device), equal to the live ones; a resume maps them by
virtual device and continues the uninterrupted run exactly."""
import json

import pytest
import torch
import torch.distributed as dist

import checkpoints
import guard
import losses
import trainstep
from fault_runs import overrides
from helpers import as_dict, free_port, run, run_distributed, scalars, tiny_config

COLLECTIVES = ('all_reduce', 'broadcast', 'gather', 'all_gather', 'all_gather_into_tensor', 'all_to_all', 'scatter')


def state_for(rank, accum):
    cfg = tiny_config()
    cfg.accum_steps = accum
    state = trainstep.build_state(cfg, torch.device('cpu'), rank)
    state.bad_totals = guard.bad_counts([])     # as train.py sizes them: one count per kind
    state.queue = torch.nn.functional.normalize(  # rows no fresh queue has
        torch.randn(state.queue.shape, generator=torch.Generator().manual_seed(100 + rank)), dim=-1)
    return cfg, state


def _rows_worker(rank, world, out):
    issued = []
    for name in COLLECTIVES:
        fn = getattr(dist, name)
        setattr(dist, name, lambda *a, _fn=fn, _name=name, **k:
                issued.append(f'{_name} {list(a[0].shape) if torch.is_tensor(a[0]) else ""}') or _fn(*a, **k))
    cfg, state = state_for(rank, accum=2)
    live = state.queue.clone()
    saved = state.state_dict(as_dict(cfg))
    assert torch.equal(state.queue, live)       # a broadcast source is not changed
    if rank == 0:
        state.queue.add_(1)                      # the checkpoint holds copies, not the live rows
        torch.save(saved['queues'], f'{out}/saved.pt')
    torch.save({'live': live, 'issued': issued}, f'{out}/rank{rank}.pt')


def test_queues_reach_rank_0_one_row_at_a_time_equal_to_the_live_ones(tmp_path):
    """2 processes x 2 virtual devices: the checkpoint's queues are the four live queues in
    virtual-device order; each rank issues the bad-sample all-reduce and one broadcast per row of
    rank 1, each of one queue's shape [Q, D]; no gather or all-gather."""
    run_distributed(_rows_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    saved = torch.load(tmp_path / 'saved.pt')
    want = [q for r in ranks for q in r['live']]
    assert len(saved) == 4 and all(torch.equal(a, b) for a, b in zip(saved, want))
    q, d = tiny_config().loss.queue_size, tiny_config().model.embed_dim
    for r in ranks:
        assert r['issued'] == [f'all_reduce {[len(guard.BAD_KINDS)]}'] + [f'broadcast {[q, d]}'] * 2


@pytest.mark.parametrize('world, accum', [(4, 1), (2, 2), (1, 4), (8, 1)])
def test_resumed_queues_follow_the_virtual_device(monkeypatch, world, accum):
    """A checkpoint of 4 virtual devices (1 process x 4) loaded as `world` x `accum`: virtual
    device v = rank * accum + j gets saved queue v; beyond the saved ones (8 x 1) a rank keeps its
    fresh queues."""
    monkeypatch.setattr(losses, 'world_info', lambda: (0, 1))
    cfg, source = state_for(0, accum=4)
    saved = source.state_dict(as_dict(cfg))
    for rank in range(world):
        monkeypatch.setattr(losses, 'world_info', lambda rank=rank: (rank, world))
        _, state = state_for(rank, accum)
        before = state.queue.clone()
        state.load_state_dict(saved)
        for j in range(accum):
            v = rank * accum + j
            assert torch.equal(state.queue[j], saved['queues'][v] if v < 4 else before[j]), (rank, j)


def test_two_process_accumulating_run_resumes_exactly_under_hccl_rules(tmp_path, demo_dir, accumulating_run):
    """2 processes x 2 micro-batches under tests/hccl_rules.py, stopped at step 2 and resumed:
    the per-step losses, the four queues and their pointer equal the uninterrupted run's; each
    save moves the queues by broadcasts of one [Q, D] queue, none by a gather."""
    args = ['--config', 'configs/demo.py:smoke', *overrides(demo_dir, max_iter=4, accum_steps=2)]

    def launch(name, workdir, *extra):
        return run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
                    'tests/hccl_rules.py', str(tmp_path / name), 'train.py', '--workdir', str(workdir), *args, *extra])
    (full, collectives), part = accumulating_run, tmp_path / 'part'
    for res in (launch('first', part, '--config.stop_at=2'), launch('second', part)):
        assert res.returncode == 0, res.stderr[-3000:]
    want, got = scalars(full, 'loss/total')[0], scalars(part, 'loss/total')[0]
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    a, b = (checkpoints.safe_load(w / 'checkpoints' / 'last.pt') for w in (part, full))
    assert a['queue_ptr'] == b['queue_ptr'] and len(a['queues']) == len(b['queues']) == 4
    assert all(torch.equal(x, y) for x, y in zip(a['queues'], b['queues']))
    for folder, saves in ((collectives, 2), (tmp_path / 'first', 1), (tmp_path / 'second', 1)):
        seqs = [json.loads((folder / f'rank{r}.json').read_text()) for r in (0, 1)]
        assert seqs[0] == seqs[1]
        assert seqs[0].count('broadcast torch.float32 [4096, 128]') == 2 * saves, folder.name
        assert not [c for c in seqs[0] if c.startswith('gather ')], folder.name
