"""Mistakes in the training command end in one line, ``sparsevd-train: error: ...``, with
exit status 2 and no traceback; a refused run leaves no output folder behind, and a run
that fails once it has one writes why into its train.log."""

import os
import subprocess
import sys

import pytest
import torch

from sparsevd.experiments import checkpoints, cli, loop, results

from test_train import _args, _idx_dir


def _mistake(capsys, argv):
    """Run the command; returns its one error line (checked: exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("sparsevd-train: error: ") and errors[0] == err.splitlines()[-1]
    return errors[0]


@pytest.fixture
def data(tmp_path):
    return _idx_dir(tmp_path / "data", n_train=100)


@pytest.fixture
def no_finish(monkeypatch):
    monkeypatch.setattr(results, "write_results", lambda *args, **kwargs: None)


def test_missing_data_and_a_file_as_out_are_one_line_errors_in_the_real_command(tmp_path):
    """The two tracebacks of issue 20, through ``python -m sparsevd.train`` itself."""
    (tmp_path / "a-file").write_text("not a directory")
    for flags, message in [(["--data-dir", "/nonexistent", "--out", str(tmp_path / "out")],
                            "error: --data-dir /nonexistent does not exist"),
                           (["--out", str(tmp_path / "a-file")], f"error: --out {tmp_path / 'a-file'} is a file")]:
        result = subprocess.run([sys.executable, "-m", "sparsevd.train", *flags], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.splitlines()[-1].startswith("sparsevd-train: " + message), result.stderr
    assert sorted(os.listdir(tmp_path)) == ["a-file"]  # nothing written


def test_flags_naming_missing_or_wrong_files_are_one_line_errors_and_leave_nothing(tmp_path, capsys, data,
                                                                                   no_finish):
    flags = ["--data-dir", str(data), "--epochs", "1", "--batch-size", "50"]
    dense = tmp_path / "dense"
    cli.run(_args(dense, *flags, "--method", "dense"))
    (tmp_path / "a-file").write_text("")
    empty, bad = tmp_path / "empty", tmp_path / "bad"
    empty.mkdir()
    bad.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (bad / name).write_bytes(b"\x12\x34 not IDX")
    cases = [
        (["--data-dir", str(tmp_path / "a-file")], f"--data-dir {tmp_path / 'a-file'} is not a directory"),
        (["--data-dir", str(empty)], f"no train-images-idx3-ubyte[.gz] in {empty}"),
        (["--data-dir", str(bad)], "train-images-idx3-ubyte: not an IDX file (bad magic number"),
        (flags + ["--resume"], "--resume: no checkpoint"),
        (flags + ["--resume-from", str(tmp_path / "nothing.pt")], "--resume-from: no checkpoint"),
        (flags + ["--init-from", str(tmp_path / "nowhere")], "--init-from: no checkpoint"),
        (flags + ["--compare-dense", str(tmp_path / "nowhere")], "--compare-dense: cannot read"),
        (flags + ["--threshold", "x"], "--threshold must be a number or 'auto'"),
    ]
    for extra, message in cases:
        out = tmp_path / "new"
        line = _mistake(capsys, _args(out, *extra))
        assert message in line, line
        assert not out.exists(), extra  # a refused run leaves no output folder behind
    # an --out under a file cannot be made
    line = _mistake(capsys, _args(tmp_path / "a-file" / "run", *flags))
    assert f"--out {tmp_path / 'a-file' / 'run'}: cannot create it" in line
    # a finished run is not overwritten, and its folder is left as it was
    before = sorted(os.listdir(dense))
    line = _mistake(capsys, _args(dense, *flags, "--method", "dense"))
    assert "checkpoint.pt exists: pass --resume" in line and sorted(os.listdir(dense)) == before
    # a damaged checkpoint: one line, though torch's own message has several
    (dense / checkpoints.CHECKPOINT).write_bytes(b"garbage")
    assert "is corrupt or not a checkpoint" in _mistake(capsys, _args(dense, *flags, "--method", "dense", "--resume"))


def test_a_run_that_fails_writes_why_into_its_log(tmp_path, monkeypatch, data, no_finish):
    flags = ["--data-dir", str(data), "--epochs", "3", "--batch-size", "50"]
    real_step, calls = loop.step, []

    def failing_step(*args):
        calls.append(1)
        if len(calls) > 3:  # 2 steps per epoch: fails in the second epoch
            raise RuntimeError("out of memory, say")
        return real_step(*args)

    monkeypatch.setattr(loop, "step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.run(_args(tmp_path / "failed", *flags))
    log = (tmp_path / "failed" / "train.log").read_text()
    assert "error: the run failed after epoch 1: RuntimeError: out of memory, say" in log
    assert "Traceback" in log  # an unexpected failure keeps its traceback, in the log
    calls.clear()
    monkeypatch.setattr(loop, "step", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        cli.run(_args(tmp_path / "stopped", *flags))
    assert "interrupted after epoch 0: the last finished epoch is in the checkpoint; run again with --resume" in (
        tmp_path / "stopped" / "train.log").read_text()


def test_a_checkpoint_of_another_network_is_reported_in_the_log_and_in_one_line(tmp_path, capsys, data, no_finish):
    flags = ["--data-dir", str(data), "--epochs", "1", "--batch-size", "50"]
    cli.run(_args(tmp_path / "run", *flags))
    path = tmp_path / "run" / checkpoints.CHECKPOINT
    state = torch.load(path, weights_only=True)
    state["model"] = {"nonsense": torch.zeros(1)}
    torch.save(state, path)
    line = _mistake(capsys, _args(tmp_path / "again", *flags, "--resume-from", str(path)))
    assert f"{path} does not fit this model" in line
    assert f"error: {path} does not fit this model" in (tmp_path / "again" / "train.log").read_text()
