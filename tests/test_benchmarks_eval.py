"""benchmarks/eval_scale.py at a tiny size: every method runs in its own process, they agree, and
faiss is skipped with one line when it cannot be imported."""
import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'eval_scale.py')
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import eval_scale  # noqa: E402
from _train_fixtures import python_env, run_process  # noqa: E402


def faiss_importable():
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


def run_tiny(*extra, env=None):
    done = run_process([sys.executable, SCRIPT, '--num', '600', '--dim', '16', '--ks', '1,5,50', *extra],
                       env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def check_tiny_output(out, methods):
    assert 'R@K of all methods identical: yes' in out
    rows = re.findall(r'^\| (evaluate|full_matrix|faiss) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|', out, re.M)
    assert [row[0] for row in rows] == methods
    expect_faiss = 'faiss' in methods
    assert ('faiss is not installed: skipped' in out) == (not expect_faiss)
    # the default noise at 16 dims: 3.0 * (16 / 1536) ** 0.25 = 0.955
    assert 'noise 0.96' in out
    line = next(v for v in out.splitlines() if v.startswith('evaluate '))
    recalls = [float(v) for v in re.findall(r'R@\d+ ([\d.]+)', line)]
    # at the scaled default noise the task is neither trivial nor hopeless
    assert len(recalls) == 3 and 20 < recalls[0] <= recalls[1] <= recalls[2] <= 100 and recalls[0] < 95


@pytest.mark.slow
def test_eval_scale_tiny_run_agrees():
    """With whatever is installed here: faiss is compared when importable, skipped otherwise."""
    check_tiny_output(run_tiny(), ['evaluate', 'full_matrix'] + ['faiss'] * faiss_importable())


@pytest.mark.slow
def test_eval_scale_without_faiss(tmp_path):
    """A `faiss` module that fails to import, first on the path: the run skips it with one line."""
    (tmp_path / 'faiss.py').write_text("raise ImportError('hidden by the test')\n")
    env = python_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')]))
    # full_matrix left out: one child process less; faiss asked for explicitly
    check_tiny_output(run_tiny('--methods', 'evaluate,faiss', env=env), ['evaluate'])


@pytest.mark.slow
def test_bad_flag_is_one_error_line():
    done = run_process([sys.executable, SCRIPT, '--num', '1'], cwd=ROOT)
    assert done.returncode == 1 and done.stdout == ''
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith('error: --num')


@pytest.mark.parametrize('dim, noise', [(1536, 3.0), (64, 1.3554)])
def test_default_noise_scales_with_dim(dim, noise):
    assert abs(eval_scale.default_noise(dim) - noise) < 1e-4
    assert eval_scale.parse_args(['--dim', str(dim)]).noise == eval_scale.default_noise(dim)
    assert eval_scale.parse_args(['--dim', str(dim), '--noise', '0.5']).noise == 0.5


def test_synthetic_features_are_sop_like():
    features, labels = eval_scale.make_features(5000, 8, 5.3, 1.0, seed=0)
    assert features.shape == (5000, 8) and features.dtype == np.float32
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    assert 4.8 < sizes.mean() < 5.8 and sizes.max() <= 12
