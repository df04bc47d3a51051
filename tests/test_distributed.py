"""Multi-process training with torchrun: 2 CPU processes over gloo on the tiny dataset, killed and resumed."""
import os
import shutil
import sys

import pandas as pd
import pytest
import torch

from _train_fixtures import EPOCHS, REPO, RUN_NAME, VAL_FLAGS, flags, free_port, out, run_process, run_script, tensors
import metrics
import model as model_lib
import cli
import distributed
import imaging
import runs
import train


def test_shard_range_and_gather_without_torchrun():
    # contiguous shards concatenate back to the whole range, whatever the sizes
    for n, world in [(12, 2), (7, 3), (2, 4), (0, 2)]:
        shards = [distributed.shard_range(n, r, world) for r in range(world)]
        assert [i for shard in shards for i in shard] == list(range(n))
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= (-(-n // world) if n else 0)
    x = torch.arange(6.0).view(3, 2)
    rt = distributed.Runtime(torch.device('cpu'), False)
    assert distributed.all_gather_rows(x) is x and (rt.rank, rt.world_size, rt.main) == (0, 1, True)
    assert distributed.all_reduce_sum([1.0, 2.0], torch.device('cpu')) == [1.0, 2.0]



def test_resolve_device_names_what_is_wrong():
    assert distributed.resolve_device('cpu') == torch.device('cpu')
    count = torch.cuda.device_count()  # 0 here without CUDA: cuda:0 is then refused like cuda:{count}
    with pytest.raises(cli.UserError, match=rf'--device cuda:{count}: this machine has {count} CUDA device\(s\); '
                                              r'use --device cpu, or cuda:N below that count'):
        distributed.resolve_device(f'cuda:{count}')
    for bad in ('tpu', 'cuda:x', 'mps'):
        with pytest.raises(cli.UserError, match=f"unknown --device '{bad}': expected cpu, cuda or cuda:N"):
            distributed.resolve_device(bad)

GATHER_SCRIPT = '''
import sys
import torch
sys.path.insert(0, sys.argv[1])
import distributed
rt = distributed.Runtime(distributed.init_distributed('cpu'), False)
rank, world = rt.rank, rt.world_size
rows = distributed.shard_range(5, rank, world)                    # rank 0: 0, 1, 2; rank 1: 3, 4
mine = torch.tensor([[float(i), 10.0 * i] for i in rows])   # [n_rank, 2], unequal n_rank
gathered = distributed.all_gather_rows(mine)
totals = distributed.all_reduce_sum([len(rows), rank], torch.device('cpu'))
if rank == 0:
    torch.save({'gathered': gathered, 'totals': totals}, sys.argv[2])
distributed.cleanup_distributed()
'''


@pytest.mark.slow
def test_gather_unequal_shards_in_order(tmp_path):
    script, result = tmp_path / 'gather.py', tmp_path / 'gathered.pth'
    script.write_text(GATHER_SCRIPT)
    run = run_process([*torchrun(), script, REPO, result])
    assert run.returncode == 0, run.stderr[-3000:]
    saved = tensors(result)
    assert torch.equal(saved['gathered'], torch.tensor([[0.0, 0.0], [1.0, 10.0], [2.0, 20.0],
                                                        [3.0, 30.0], [4.0, 40.0]]))
    assert saved['totals'] == [5.0, 1.0]


def torchrun():
    return (sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}')


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_kill_and_resume(val_dataset, val_reference, tmp_path):
    results = tmp_path / 'results'
    # pre-empted during epoch 2: SIGTERM to torchrun, which forwards it to both processes; they stop at once
    # and the relaunch with --resume auto finishes the run. With a validation split: every process draws the same
    # held-out classes from the seed, one classifier of the 3 remaining classes
    killed = run_script(flags(val_dataset, results, *VAL_FLAGS), fault='terminate:2:1', launcher=torchrun())
    assert killed.returncode != 0
    assert killed.stderr.count('interrupted: stopped at once; the last checkpoint is intact') == 1, killed.stderr
    # epoch 1's files are written in the background: none yet, or whole
    assert not os.path.exists(out(results, 'checkpoint.pth')) or tensors(out(results, 'checkpoint.pth'))['epoch'] == 1
    assert 'Cache: ' in killed.stdout and 'in RAM, shared by the processes of each node' in killed.stdout
    assert not [f for f in os.listdir('/dev/shm') if f.startswith('clf-cache-')]  # mapped, then unlinked
    assert killed.stdout.count('Config:') == 1 and 'world_size         2' in killed.stdout
    assert killed.stdout.count(f'Epoch 1/{EPOCHS} |') == 1  # rank 0 alone prints
    result = run_script(flags(val_dataset, results, *VAL_FLAGS, '--resume', 'auto'), launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f'Epoch 2/{EPOCHS} |') == 1
    assert sorted(os.listdir(results)) == sorted([f'.{RUN_NAME}.lock'] + [f'{RUN_NAME}_{kind}' for kind in runs.OUTPUTS])
    stats = pd.read_csv(out(results, 'statistics.csv'))
    assert stats['epoch'].tolist() == list(range(1, EPOCHS + 1))
    assert list(stats.columns)[-4:] == ['val_recall@1', 'val_recall@2', 'val_map@r', 'val_r_precision']
    first = [line for line in killed.stdout.splitlines() if f'Epoch 1/{EPOCHS} |' in line][0]
    assert f'train loss {stats["train_loss"][0]:.4f} acc {stats["train_accuracy"][0]:.2f}%' in first
    assert f'| val R@1 {stats["val_recall@1"][0]:.2f}% ' in first
    best = stats['val_recall@1'].idxmax()  # chosen by validation R@1, the first maximum
    assert f'Selected epoch {best + 1} by validation R@1 {stats["val_recall@1"][best]:.2f}%' in result.stdout

    # features gathered from the two shards in order: the saved model re-embeds each image into its row
    database = tensors(out(results, 'data_base.pth'))
    single = tensors(out(val_reference[0], 'data_base.pth'))
    assert database['test_images'] == single['test_images'] and database['test_labels'] == single['test_labels']
    assert database['config']['num_classes'] == 3 and len(database['test_images']) == 20
    state = tensors(out(results, 'model.pth'))
    assert state['classifier.1.weight'].shape[0] == 3
    model = model_lib.Model('resnet18', 8, 3)
    model.load_state_dict(state)
    model.eval()
    mean, std = database['config']['mean'], database['config']['std']
    with torch.no_grad():
        again, _ = model(torch.stack([imaging.eval_input(p, 32, mean, std) for p in database['test_images']]))
    assert torch.allclose(again, database['test_features'], atol=1e-5)
    ids = {label: k for k, label in enumerate(sorted(set(database['test_labels'])))}
    found = metrics.evaluate(database['test_features'], [ids[label] for label in database['test_labels']], [1, 2])
    assert 100 * found['R@1'] == stats['test_recall@1'][best]
    assert tensors(out(results, 'checkpoint.pth'))['epoch'] == EPOCHS


@pytest.mark.slow
def test_torchrun_user_error_printed_once(dataset, tmp_path):
    result = run_script(flags(dataset, tmp_path, '--recalls', '1,x'), launcher=torchrun())
    assert result.returncode != 0
    assert result.stderr.count("error: --recalls '1,x'") == 1  # one process speaks for both


SLOW_RANK_SCRIPT = '''
import os, sys, threading
sys.path.insert(0, sys.argv[1])
import train, cli

def main():
    if os.environ['RANK'] == '0':
        # rank 1 finds the error and exits first; torchrun then stops this rank (SIGTERM), which ends the wait
        threading.Event().wait(600)
        print('rank 0 was not stopped within 600 s', file=sys.stderr, flush=True)
    train.main(sys.argv[2:])

cli.run_cli(main, train.INTERRUPTED)
'''


@pytest.mark.slow
def test_torchrun_user_error_printed_once_when_another_rank_exits_first(dataset, tmp_path):
    script = tmp_path / 'slow_rank_0.py'
    script.write_text(SLOW_RANK_SCRIPT)
    result = run_process([*torchrun(), script, REPO, *flags(dataset, tmp_path, '--recalls', '1,x')])
    assert result.returncode != 0
    assert result.stderr.count("error: --recalls '1,x'") == 1, result.stderr[-3000:]
    assert 'rank 0 was not stopped' not in result.stderr  # it was: torchrun's SIGTERM ended its wait
    assert 'interrupted:' not in result.stderr  # rank 0, stopped by torchrun, knows the error was told


@pytest.mark.slow
def test_torchrun_error_of_rank_0_alone_printed_once_without_tracebacks(dataset, reference, tmp_path):
    # rank 0 refuses to replace a finished run after the process group exists; rank 1, waiting at a barrier,
    # loses its peer: its broken collective is no second report
    results = shutil.copytree(reference[0], tmp_path / 'copy')
    result = run_script(flags(dataset, results), launcher=torchrun())
    assert result.returncode != 0
    assert result.stderr.count('error: ') == 1 and 'holds a run of this name' in result.stderr, result.stderr[-3000:]
    assert 'Connection closed by peer' not in result.stderr and 'interrupted:' not in result.stderr
