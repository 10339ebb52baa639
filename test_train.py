"""train.py: flags, checkpoints, resume, NaN guard, run locks, DDP."""

import math
import os
import subprocess
import sys

import pytest
import torch

from looped import LoopedTransformer, CheckpointError
import analyze
import train

from conftest import HERE, run_script, quick_args


@pytest.mark.parametrize('args,message', [
    (['--recall', 'bogus'], 'unknown recall'),
    (['--task', 'nope'], 'unknown task'),
    (['--d_model', '30', '--n_head', '4'], 'not divisible'),
    (['--outer_norm', 'maybe'], 'expected true or false'),
    (['--no_such_flag', '1'], 'unrecognized arguments'),
    (['--resume'], 'cannot resume'),
])
def test_bad_flags_exit_with_one_line(tmp_path, args, message):
    result = run_script('train.py', '--out_dir', str(tmp_path / 'run'), '--max_steps', '1', *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and 'Traceback' not in result.stderr


def logged_losses(stdout):
    return [float(line.split('| loss ')[1].split()[0]) for line in stdout.splitlines() if line.startswith('step ')]


def weights(path):
    return torch.load(path, weights_only=True)['model']


def start_and_interrupt(args, ckpt, sig):
    """Start train.py, wait for its first checkpoint, then send `sig`; returns the finished process."""
    import time
    proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc, out, err


@pytest.mark.parametrize('sig_name', ['SIGKILL', 'SIGINT'])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, sig_name):
    """kill -9 (resume from the periodic checkpoint) or Ctrl-C (saves, exits 130), then --resume:
    the final weights equal those of an uninterrupted run, bit for bit, and so do the logged losses."""
    import signal as _signal
    args = lambda d: quick_args(tmp_path / d, '--max_steps', '60', '--ckpt_interval', '5', '--eval_n', '4', '--eval_difficulties', '8')
    full = run_script('train.py', *args('full'))
    assert full.returncode == 0, full.stderr
    proc, out, err = start_and_interrupt(args('cut'), tmp_path / 'cut' / 'ckpt.pt', getattr(_signal, sig_name))
    if sig_name == 'SIGINT':
        assert proc.returncode == 130 and 'interrupted: saved step' in out
    cut_step = torch.load(tmp_path / 'cut' / 'ckpt.pt', weights_only=True)['step']
    assert 0 < cut_step < 60, 'the run must be cut before its end for this test to mean anything'
    resumed = run_script('train.py', *args('cut'), '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert f'resuming' in resumed.stdout
    a, b = weights(tmp_path / 'full' / 'ckpt.pt'), weights(tmp_path / 'cut' / 'ckpt.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(full.stdout)[cut_step:] == logged_losses(resumed.stdout)


def test_same_seed_same_losses(tmp_path):
    one = run_script('train.py', *quick_args(tmp_path / 'a', '--max_steps', '5'))
    two = run_script('train.py', *quick_args(tmp_path / 'b', '--max_steps', '5'))
    assert logged_losses(one.stdout) == logged_losses(two.stdout) and len(logged_losses(one.stdout)) == 5


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """Force the loss to NaN at the 7th step: the run stops with a one-line message naming the
    last checkpoint (step 6), which is left intact and loadable."""
    calls = []
    original = train.ProgressiveLoss.forward

    def diverging(self, *args, **kw):
        calls.append(1)
        loss, *rest = original(self, *args, **kw)
        return (loss * float('nan') if len(calls) >= 7 else loss, *rest)
    monkeypatch.setattr(train.ProgressiveLoss, 'forward', diverging)
    with pytest.raises(SystemExit) as err:
        train.main(quick_args(tmp_path, '--max_steps', '20', '--ckpt_interval', '3'))
    assert 'loss is nan at step 6' in str(err.value) and 'step 6' in str(err.value).split('checkpoint')[1]
    model = LoopedTransformer.from_checkpoint(tmp_path / 'ckpt.pt')
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_with_a_different_config_is_refused(tmp_path):
    train.main(quick_args(tmp_path, '--max_steps', '2'))
    for extra, field in ((['--d_model', '32'], 'd_model'), (['--lr', '0.5'], 'lr')):
        result = run_script('train.py', *quick_args(tmp_path, '--max_steps', '4', '--resume', *extra))
        assert result.returncode != 0 and field in result.stderr and len(result.stderr.strip().splitlines()) == 1
    again = run_script('train.py', *quick_args(tmp_path, '--max_steps', '4'))
    assert again.returncode != 0 and 'already exists' in again.stderr


BAD_FLAGS = [['--lr', '-1'], ['--beta2', '1'], ['--grad_clip', '-1'], ['--log_interval', '0'], ['--seed', str(2 ** 64)],
             ['--vocab_size', '1'], ['--eval_mults', 'abc'], ['--eval_mults', 'nan'], ['--eval_mults', '0'], ['--eval_batch', '0'],
             ['--pos', 'learned', '--eval_difficulties', '8,32'], ['--device', 'foo'], ['--n_iters', '100000000'],
             ['--eval_mults', '1e12'], ['--weight_decay', '-1']]


def test_bad_flags_are_refused_before_anything_is_built_or_written(tmp_path):
    """Every flag is checked up front: a one-line error, no out_dir made, and an existing run
    untouched even with --overwrite."""
    train.main(quick_args(tmp_path / 'old', '--max_steps', '1'))
    before = {f: (tmp_path / 'old' / f).read_bytes() for f in ('ckpt.pt', 'eval.json')}
    for args in BAD_FLAGS:
        for out_dir, extra in ((tmp_path / 'new', []), (tmp_path / 'old', ['--overwrite'])):
            with pytest.raises(SystemExit) as err:
                train.main(quick_args(out_dir, *args, *extra))
            assert str(err.value).startswith('train.py: error: ') and '\n' not in str(err.value), (args, err.value)
    assert not (tmp_path / 'new').exists()
    assert before == {f: (tmp_path / 'old' / f).read_bytes() for f in ('ckpt.pt', 'eval.json')}


def test_non_finite_final_state_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    """The last step turns the weights NaN (the loss it reported was finite): the end-of-run save
    refuses, the run stops with one line, and the good checkpoint of step 2 stays byte for byte."""
    train.main(quick_args(tmp_path, '--max_steps', '2'))
    good = (tmp_path / 'ckpt.pt').read_bytes()
    step = torch.optim.AdamW.step

    def poisoned(self, *args, **kw):
        out = step(self, *args, **kw)
        if self.state[self.param_groups[0]['params'][0]]['step'] == 4:
            for group in self.param_groups:
                for p in group['params']:
                    p.data.fill_(math.nan)
        return out
    monkeypatch.setattr(torch.optim.AdamW, 'step', poisoned)
    with pytest.raises(SystemExit) as err:
        train.main(quick_args(tmp_path, '--max_steps', '4', '--resume'))
    assert 'not finite at step 4' in str(err.value) and 'step 2' in str(err.value)
    assert (tmp_path / 'ckpt.pt').read_bytes() == good and not (tmp_path / 'run.lock').exists()


def test_a_claimed_out_dir_is_refused_and_a_stale_claim_taken_over(tmp_path):
    import socket
    (tmp_path / 'run.lock').write_text(f'{socket.gethostname()} {os.getpid()}')    # a live run: this process
    with pytest.raises(SystemExit) as err:
        train.main(quick_args(tmp_path, '--max_steps', '1'))
    assert f'in use by another run (pid {os.getpid()}' in str(err.value) and not (tmp_path / 'ckpt.pt').exists()
    assert (tmp_path / 'run.lock').exists()                                          # the other run's claim stays
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / 'run.lock').write_text(f'{socket.gethostname()} {dead.pid}')         # its run died without releasing
    train.main(quick_args(tmp_path, '--max_steps', '1'))
    assert (tmp_path / 'ckpt.pt').exists() and not (tmp_path / 'run.lock').exists()


def test_unreadable_checkpoints_give_one_line_everywhere(tmp_path):
    """An empty file, a checkpoint without optimizer state and one whose weights do not fit its
    config: one whole line from from_checkpoint, train --resume and analyze.py."""
    train.main(quick_args(tmp_path / 'good', '--max_steps', '1'))
    ckpt = torch.load(tmp_path / 'good' / 'ckpt.pt', weights_only=True)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'ckpt.pt').write_bytes(b'')
    (tmp_path / 'noopt').mkdir()
    torch.save({k: v for k, v in ckpt.items() if k != 'optimizer'}, tmp_path / 'noopt' / 'ckpt.pt')
    (tmp_path / 'mismatch').mkdir()
    ckpt['model']['tok_emb.weight'] = torch.zeros(3, 32)
    torch.save(ckpt, tmp_path / 'mismatch' / 'ckpt.pt')
    for name, words in (('empty', 'empty'), ('noopt', 'no training state'), ('mismatch', 'do not match')):
        path = tmp_path / name / 'ckpt.pt'
        with pytest.raises(SystemExit) as err:
            train.main(quick_args(tmp_path / name, '--max_steps', '2', '--resume'))
        assert words in str(err.value) and '\n' not in str(err.value), err.value
        if name != 'noopt':                                                          # its weights load fine
            with pytest.raises(CheckpointError, match=words) as err:
                LoopedTransformer.from_checkpoint(path)
            with pytest.raises(SystemExit) as err:
                analyze.main([str(path)])
            assert words in str(err.value) and '\n' not in str(err.value)


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo), each on half of the same global batch, logs the same
    losses and ends at the same weights as one process (to float round-off)."""
    one = run_script('train.py', *quick_args(tmp_path / 'one', '--max_steps', '8'))
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py',
                          *quick_args(tmp_path / 'two', '--max_steps', '8', '--device', 'cpu')],
                         cwd=HERE, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert 'x2' in two.stdout
    l1, l2 = logged_losses(one.stdout), logged_losses(two.stdout)
    assert len(l1) == len(l2) == 8 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    a, b = weights(tmp_path / 'one' / 'ckpt.pt'), weights(tmp_path / 'two' / 'ckpt.pt')
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
