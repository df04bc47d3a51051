"""benchmarks/eval_scale.py at a tiny size: every method runs in its own process and they agree."""
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'eval_scale.py')


def test_eval_scale_tiny_run_agrees():
    done = subprocess.run([sys.executable, SCRIPT, '--num', '600', '--dim', '16', '--noise', '0.8',
                           '--ks', '1,5,50'], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert 'R@K of all methods identical: yes' in out
    rows = re.findall(r'^\| (evaluate|full_matrix|faiss) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|', out, re.M)
    methods = [row[0] for row in rows]
    assert methods[:2] == ['evaluate', 'full_matrix']
    try:
        import faiss  # noqa: F401
        assert methods == ['evaluate', 'full_matrix', 'faiss']
    except ImportError:
        assert 'faiss is not installed: skipped' in out
    recalls = [float(v) for v in re.findall(r'R@\d+ ([\d.]+)', out.splitlines()[1])]
    assert len(recalls) == 3 and 0 < recalls[0] <= recalls[1] <= recalls[2] <= 100


def test_synthetic_features_are_sop_like():
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    import eval_scale
    features, labels = eval_scale.make_features(5000, 8, 5.3, 1.0, seed=0)
    assert features.shape == (5000, 8) and features.dtype == np.float32
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    assert 4.8 < sizes.mean() < 5.8 and sizes.max() <= 12
