"""rerank.py: k-reciprocal re-ranking against fastreid 1.4.0's numpy reference, aqe against a direct computation,
the identities (lambda = 1, k = 0), lists without the item itself, permutation and chunk invariance, test.py
--evaluate against the statistics CSV, the one-line refusals, and the O(N x K) memory bound."""
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import metrics
import rerank
import rerank_eval
from _query_fixtures import load_script, run_test_script
from _train_fixtures import REPO, TIMEOUT, out, python_env


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def reference_re_ranking():
    """fastreid 1.4.0's evaluation/rerank.py, loaded alone (its package imports need fastreid's dependencies)."""
    try:
        found = [f for f in importlib.metadata.files('fastreid') if str(f).endswith('evaluation/rerank.py')]
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('fastreid==1.4.0 is not installed (requirements-test.txt)')
    spec = importlib.util.spec_from_file_location('fastreid_rerank', found[0].locate())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.re_ranking


def set_distances(features, k1, k2, lam, chunk=None, monkeypatch=None):
    """Our blended distances of every item of a set against every other [N, N] (diagonal NaN), lists covering it."""
    if chunk:
        monkeypatch.setattr(rerank, 'CHUNK', chunk)
    num = len(features)
    lists = rerank.neighbour_lists(features, None, num - 1)
    out = rerank.kreciprocal(features, rerank.graph(lists), torch.arange(num), lists[1], k1, k2, lam)
    dense = np.full((num, num), np.nan)
    np.put_along_axis(dense, lists[1].numpy(), out.numpy(), 1)
    return dense


def test_kreciprocal_equals_the_reference():
    re_ranking = reference_re_ranking()
    queries, gallery = unit(300, 64, 0), unit(300, 64, 1)
    distance = lambda a, b: np.sqrt(np.clip(2 - 2 * (a.double() @ b.double().T).numpy(), 0, None))  # it squares
    expected = re_ranking(distance(queries, gallery), distance(queries, queries), distance(gallery, gallery), 20, 6, 0.3)
    lists = rerank.neighbour_lists(gallery, None, len(gallery) - 1)
    merged = rerank.merged_lists(lists, gallery, queries, len(queries) + len(gallery) - 1)
    _, candidates = rerank.neighbour_lists(queries, gallery, len(gallery))
    ours = rerank.kreciprocal(torch.cat([queries, gallery]), rerank.graph(merged), torch.arange(300), candidates + 300,
                              20, 6, 0.3)
    dense = np.zeros((300, 300))
    np.put_along_axis(dense, candidates.numpy(), ours.numpy(), 1)
    assert np.abs(dense - expected).max() < 1e-5
    # the same ranking: the reference's distances in our order never decrease (beyond float32 rounding)
    ranked = np.take_along_axis(expected, np.argsort(dense, 1, kind='stable'), 1)
    assert (np.diff(ranked, axis=1) > -1e-6).all()


def test_aqe_vectors_equal_a_direct_computation():
    x, k, alpha = unit(50, 8, 2).double(), 3, 3.0
    sims = x @ x.T
    sims.fill_diagonal_(-np.inf)
    top = sims.topk(k, dim=1)
    expected = F.normalize(x + (top.values.clamp(min=0) ** alpha)[:, :, None].mul(x[top.indices]).sum(1), dim=1)
    lists = rerank.neighbour_lists(x, None, k)
    assert torch.allclose(rerank.augment(x, x, lists, k, alpha), expected, atol=1e-6)
    queries = unit(5, 8, 3).double()
    qs = queries @ x.T
    qtop = qs.topk(k, dim=1)
    direct = F.normalize(queries + (qtop.values.clamp(min=0) ** alpha)[:, :, None].mul(x[qtop.indices]).sum(1), dim=1)
    assert torch.allclose(rerank.augment(queries, x, rerank.neighbour_lists(queries, x, k), k, alpha), direct,
                          atol=1e-6)


@pytest.mark.parametrize('gallery', [False, True])
def test_lambda_one_and_k_zero_give_the_plain_ranking(gallery):
    x, labels = unit(120, 16, 4), [i // 6 for i in range(120)]
    args = (x[::2], labels[::2], x[1::2], labels[1::2]) if gallery else (x, labels)
    plain = metrics.rank_stats(*args)
    for method, text in (('kreciprocal', 'lambda=1'), ('aqe', 'k=0')):
        after = rerank.post_stats(method, rerank.parse_args(method, text), *args)
        assert all(torch.equal(a, b) for a, b in zip(after, plain))
    changed = rerank.post_stats('kreciprocal', rerank.parse_args('kreciprocal', 'k1=5,k2=2'), *args)
    assert not all(torch.equal(a, b) for a, b in zip(changed, plain))  # it does something otherwise


def test_no_item_in_its_own_list():
    x = unit(80, 8, 5)
    _, indices = rerank.neighbour_lists(x, None, 79)
    assert not (indices == torch.arange(80)[:, None]).any()
    assert (indices.sort(1).values == torch.tensor([[j for j in range(80) if j != i] for i in range(80)])).all()


def test_permuting_the_set_permutes_nothing_else():
    x = unit(60, 8, 6)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    plain, permuted = set_distances(x, 8, 3, 0.3), set_distances(x[order], 8, 3, 0.3)
    assert np.allclose(permuted, plain[order][:, order], atol=1e-12, equal_nan=True)


def test_independent_of_the_chunk_size(monkeypatch):
    x = unit(70, 8, 7)
    # equal up to the rounding of sums taken in another grouping
    assert np.allclose(set_distances(x, 8, 3, 0.3), set_distances(x, 8, 3, 0.3, 5, monkeypatch), atol=1e-12,
                       equal_nan=True)


def test_bootstrap_interval_holds_the_change():
    x, labels = unit(120, 16, 8), [i // 6 for i in range(120)]
    plain = metrics.rank_stats(x, labels)
    after = rerank.post_stats('aqe', rerank.parse_args('aqe', 'k=3'), x, labels)
    change = rerank_eval.bootstrap(plain, after, labels)
    assert change['MAP@R'][0] == pytest.approx(metrics.map_at_r(after) - metrics.map_at_r(plain))
    assert change['R@1'][0] == pytest.approx(metrics.recall_at_k(after, 1) - metrics.recall_at_k(plain, 1))
    for value, low, high in change.values():
        assert low <= value <= high


@pytest.mark.parametrize('text', ['k=-1', 'alpha=x', 'beta=2', 'k', 'alpha=nan'])
def test_bad_rerank_args_fail_in_one_line(text):
    with pytest.raises(rerank.UserError) as err:
        rerank.parse_args('aqe', text)
    assert '\n' not in str(err.value) and '--rerank_args' in str(err.value)


def figures(line):
    return [float(v) for v in re.findall(r'(-?\d+\.\d+)%', line)]


def test_evaluate_equals_the_statistics_row(val_reference, capsys):
    results, printed = val_reference
    epoch = int(re.search(r'Selected epoch (\d+)', printed).group(1))
    row = pd.read_csv(out(results, 'statistics.csv')).set_index('epoch').loc[epoch]
    script = load_script()
    code, text, _ = run_test_script(script, ['--data_base', out(results, 'data_base.pth'), '--evaluate'], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in text.splitlines()}
    for split in ('val', 'test'):
        columns = [f'{split}_recall@1', f'{split}_recall@2', f'{split}_map@r', f'{split}_r_precision']
        assert figures(lines[split]) == [round(row[c], 2) for c in columns]
    code, text, _ = run_test_script(script, ['--data_base', out(results, 'data_base.pth'), '--evaluate', '--rerank',
                                             'aqe', '--rerank_args', 'k=2'], capsys)
    assert code == 0 and 'test change (95 % interval' in text and 'val aqe k=2,alpha=3' in text


def test_tune_without_validation_and_bad_args_fail_in_one_line(reference, capsys):
    script, db = load_script(), out(reference[0], 'data_base.pth')
    code, _, err = run_test_script(script, ['--data_base', db, '--tune', '--rerank', 'aqe'], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and '--val_split' in err
    code, _, err = run_test_script(script, ['--data_base', db, '--evaluate', '--rerank', 'aqe', '--rerank_args',
                                            'k=2,q=1'], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and 'q=1' in err


@pytest.mark.slow
def test_neighbour_list_path_runs_where_an_n_by_n_matrix_cannot():
    """20,000 items: an N x N float32 matrix is 1.6 GB; the process may map only 1 GB more than it starts with."""
    code = textwrap.dedent('''
        import resource, sys, torch
        sys.path.insert(0, sys.argv[1])
        import metrics, rerank
        torch.set_num_threads(1)
        size = [int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmSize')][0]
        resource.setrlimit(resource.RLIMIT_AS, (size + 2 ** 30, resource.RLIM_INFINITY))
        n = 20000
        try:
            torch.empty(n, n)
            raise SystemExit('the limit did not hold')
        except RuntimeError:
            pass
        x = torch.nn.functional.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(0)), dim=1)
        labels = [i // 5 for i in range(n)]
        plain = metrics.rank_stats(x, labels)
        for method, text in (('aqe', 'k=5'), ('kreciprocal', 'k1=5,k2=2,depth=10')):
            after = rerank.post_stats(method, rerank.parse_args(method, text), x, labels, plain=plain)
            print(method, metrics.map_at_r(plain), metrics.map_at_r(after))
        ''')
    done = subprocess.run([sys.executable, '-c', code, str(REPO)], capture_output=True, text=True, timeout=TIMEOUT,
                          env=python_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'kreciprocal' in done.stdout
