"""Each file format's owner checks its version: the feature database (retrieval.py) and the checkpoint (runs.py).
A file without a version field is of version 1 and loads; another version is refused in one line saying what to do."""
import pytest
import torch

import retrieval
import runs
from cli import UserError

CONFIG = {'num_epochs': 3, 'recalls': [1, 2], 'val_split': 0.0}


def small_database(tmp_path, **changes):
    """A valid two-class database of 4 images (written with a stand-in model file) -> its path."""
    features = torch.nn.functional.normalize(torch.arange(1.0, 33.0).view(4, 8), dim=1)  # [4, 2 branches x 4]
    settings = {'backbone_type': 'resnet18', 'feature_dim': 4, 'branches': 'SM', 'num_classes': 2, 'image_size': 32,
                'data_name': 'demo', 'crop_type': 'uncropped'}
    database = retrieval.make_database([([f'{k}.jpg' for k in range(4)], ['a', 'a', 'b', 'b'], features)],
                                       settings, (0.5,) * 3, (0.25,) * 3, {'seed': 0})
    database.update(changes)
    path = tmp_path / 'x_data_base.pth'
    retrieval.save_model_and_database({}, database, str(tmp_path / 'x_model.pth'), str(path))
    return path


def test_database_version_recorded_missing_loads_other_refused(tmp_path):
    path = small_database(tmp_path)
    db, gallery = retrieval.load_database(path)
    assert db['version'] == retrieval.VERSION == 1 and not gallery and db['test_labels'] == ['a', 'a', 'b', 'b']
    assert db['config']['model_sha256'] and db['config']['settings'] == {'seed': 0}
    old = {k: v for k, v in db.items() if k != 'version'}  # written before the field existed: the same format
    torch.save(old, path)
    assert retrieval.load_database(path)[0]['test_images'] == ['0.jpg', '1.jpg', '2.jpg', '3.jpg']
    torch.save(dict(db, version=2), path)
    with pytest.raises(UserError) as err:
        retrieval.load_database(path)
    assert str(err.value) == (f'{path} is not a usable CLF feature database: it is of format version 2, this CLF '
                              f'reads version 1; rebuild it with train.py (the same flags and --overwrite) (expected '
                              f'the ..._data_base.pth that train.py writes)')


def checkpoint(**changes):
    row = {'epoch': 1, 'train_loss': 1.0, 'train_accuracy': 50.0, 'test_recall@1': 40.0, 'test_recall@2': 60.0,
           'test_map@r': 10.0, 'test_r_precision': 20.0}
    state = {'version': runs.VERSION, 'epoch': 1, 'model': {}, 'optimizer': {}, 'scheduler': {}, 'scaler': {},
             'best_recall': 0.4, 'best_epoch': 1, 'statistics': [row], 'config': {}}
    return dict(state, **changes)


def test_checkpoint_version_recorded_missing_loads_other_refused():
    assert runs.checkpoint_problem(checkpoint(), CONFIG) is None
    assert runs.checkpoint_problem({k: v for k, v in checkpoint().items() if k != 'version'}, CONFIG) is None
    assert runs.checkpoint_problem(checkpoint(version=2), CONFIG) == 'its format version 2 is not 1'
    settings = {key: CONFIG.get(key) for key in runs.RESUME_KEYS}
    with pytest.raises(UserError, match=r'^cannot resume from c.pth: its format version 2 is not 1 \(altered, or '
                                        r'written by another version of train.py\); start over with --overwrite$'):
        runs.check_checkpoint(checkpoint(version=2, config=settings), 'c.pth', settings)
