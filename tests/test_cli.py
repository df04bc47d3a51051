"""The command line's conventions (cli.run_cli) that every script shares: a reader that leaves a pipe ends the
script quietly, and --help works for every script, model.py's table included."""
import subprocess
import sys

import pytest

import model
from _train_fixtures import REPO, kill_groups

TALKER = '''
import sys
sys.path.insert(0, sys.argv[1])
import cli
cli.run_cli(lambda: [print(f'line {k}', flush=True) for k in range(10 ** 6)])
'''


@pytest.mark.slow
def test_a_reader_leaving_the_pipe_ends_the_script_quietly():
    process = subprocess.Popen([sys.executable, '-c', TALKER, str(REPO)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert process.stdout.readline() == b'line 0\n'
        process.stdout.close()  # as `| head -1` does
        assert process.wait(timeout=300) == 141  # 128 + SIGPIPE, what a shell reports for `python ... | head`
        assert process.stderr.read() == b''  # no BrokenPipeError traceback
    finally:
        kill_groups([process])  # its whole group, unless it was reaped above


def test_model_py_help_prints_usage_without_computing(capsys):
    with pytest.raises(SystemExit) as done:
        model.main(['--help'])
    assert done.value.code == 0 and capsys.readouterr().out.startswith('usage: ')
