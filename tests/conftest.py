"""Shared fixtures: the repository on sys.path, one intra-op thread, a tiny processed dataset and
one uninterrupted reference run of train.py (each made once per session)."""
import io
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tests'))


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes seconds: starts a process (train.py and the other scripts, '
                                       'torchrun, serve.py, a benchmark) or the browser, or trains a run of its own; '
                                       'the quick tier, -m "not slow", keeps the unit tests and those the session\'s '
                                       'shared runs serve')


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs with one intra-op thread (see run_script); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def dataset(tmp_path_factory):
    """The processed tiny dataset (tests must not change it)."""
    from _train_fixtures import make_dataset
    return make_dataset(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='session')
def reference(tmp_path_factory, dataset):
    """An uninterrupted in-process run of EPOCHS epochs: (results dir, what it printed)."""
    return reference_run(tmp_path_factory.mktemp('reference'), dataset)


@pytest.fixture(scope='session')
def val_dataset(tmp_path_factory):
    """The tiny dataset with VAL_CLASSES classes, enough training classes for a validation split."""
    from _train_fixtures import VAL_CLASSES, make_dataset
    return make_dataset(tmp_path_factory.mktemp('val_data'), VAL_CLASSES)


@pytest.fixture(scope='session')
def val_reference(tmp_path_factory, val_dataset):
    """An uninterrupted in-process run with VAL_FLAGS: (results dir, what it printed)."""
    from _train_fixtures import VAL_FLAGS
    return reference_run(tmp_path_factory.mktemp('val_reference'), val_dataset, *VAL_FLAGS)


def reference_run(results, data_path, *extra):
    """train.py in this process on `data_path` -> (results, what it printed)."""
    import train
    from _train_fixtures import flags
    saved, sys.stdout = sys.stdout, io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test runs (session fixtures start before one_thread)
    try:
        train.main(flags(data_path, results, *extra))
        text = sys.stdout.getvalue()
    finally:
        sys.stdout = saved
        torch.set_num_threads(threads)
    return results, text


@pytest.fixture
def inject(monkeypatch):
    """inject('nan:2:1,fail-write:checkpoint:2') applies faults in this process as
    tests/fault_launcher.py does for a subprocess; undone after the test."""
    import fault_launcher
    import files
    import train

    def apply(text):
        for module, name in ((files, 'write_temporary'), (train, 'train_one_epoch'), (train, 'train_step')):
            monkeypatch.setattr(module, name, getattr(module, name))  # restored at teardown
        faults = fault_launcher.parse(text)
        fault_launcher.patch_writes(files, faults)
        fault_launcher.patch_steps(train, faults)
    return apply
