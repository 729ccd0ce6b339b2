"""The commands and the package boundary, in fresh interpreters: ``import sparsevd`` pulls
in none of the experiment code, and ``python -m sparsevd.train`` / ``python -m
sparsevd.demo`` work from any folder, or say clearly why not."""

import argparse
import os
import shutil
import subprocess
import sys

import pytest


def _python(code_or_args, cwd, env=None):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_import_sparsevd_needs_neither_tqdm_nor_matplotlib(tmp_path):
    # torch itself imports tqdm when it is installed (torch.hub), so the test hides both
    # packages: the library must import, and use, without them
    code = ("import sys; sys.modules['tqdm'] = sys.modules['matplotlib'] = None\n"
            "import torch, sparsevd\n"
            "sparsevd.SparseVDLinear(3, 2)(torch.randn(4, 3)).sum().backward()\n"
            "assert not [m for m in sys.modules if m.startswith('sparsevd.experiments')]\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n"
            "print('ok')")
    result = _python(code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    plain = _python("import sys, sparsevd; print('matplotlib' in sys.modules)", tmp_path)
    assert plain.stdout.strip() == "False", plain.stderr


@pytest.mark.parametrize("module, usage", [("sparsevd.train", "usage: sparsevd-train"),
                                           ("sparsevd.demo", "usage: sparsevd-demo")])
def test_commands_run_from_any_folder(tmp_path, module, usage):
    result = _python(["-m", module, "--help"], tmp_path)
    assert result.returncode == 0 and usage in result.stdout, result.stderr


@pytest.mark.parametrize("module", ["sparsevd.train", "sparsevd.demo"])
def test_commands_next_to_a_folder_named_sparsevd_work_or_say_why(tmp_path, module):
    """From the folder that holds a clone named sparsevd, `python -m` imports the clone's
    folder (no __init__.py) as a namespace package `sparsevd`. With an editable install
    the command then fails; it must say why and what to do, not raise AttributeError."""
    clone = tmp_path / "sparsevd"
    (clone / "sparsevd").mkdir(parents=True)
    (clone / "README.md").write_text("a clone of the repository\n")
    result = _python(["-m", module, "--help"], tmp_path)
    if result.returncode == 0:  # a regular install: the installed package wins over the namespace
        assert "usage:" in result.stdout
        return
    assert "Traceback" not in result.stderr and "AttributeError" not in result.stderr, result.stderr
    assert f"imported {clone} as the package `sparsevd`" in result.stderr
    assert "Run the command from another folder" in result.stderr and "sparsevd-train" in result.stderr


@pytest.mark.parametrize("script", ["sparsevd-train", "sparsevd-demo"])
def test_console_scripts_work_next_to_a_folder_named_sparsevd(tmp_path, script):
    path = shutil.which(script, path=os.path.dirname(sys.executable)) or shutil.which(script)
    if path is None:
        pytest.skip(f"{script} is not installed (pip install -e . installs it)")
    (tmp_path / "sparsevd").mkdir()
    result = subprocess.run([path, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and f"usage: {script}" in result.stdout, result.stderr


def test_every_flag_of_the_training_command_shows_its_default():
    from sparsevd.experiments import config

    parser = config.build_parser()
    text = parser.format_help()
    assert "training epochs (before --finetune-epochs) (default: 200)" in " ".join(text.split())
    formatter = config.HelpFormatter("sparsevd-train")
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue  # --help
        shown = formatter._get_help_string(action)
        # a value default is shown; None (filled in from other flags) and store_true are said in words
        assert action.help and ("default" in shown or action.default is None or action.default is False), action.dest


def test_the_demo_and_compare_commands_explain_their_flags(tmp_path):
    demo = _python(["-m", "sparsevd.demo", "--help"], tmp_path)
    assert demo.returncode == 0, demo.stderr
    help_text = " ".join(demo.stdout.split())  # argparse wraps the help at the terminal's width
    for flag in ("--dense-epochs", "--epochs", "--finetune-epochs", "--lr", "--threshold", "--seed"):
        option = help_text[help_text.index(f" {flag} ", help_text.index("options:")):]
        assert "(default: " in option.split(" --")[1], f"{flag} shows no default"
    result = _python(["-m", "sparsevd.compare", "--help"], tmp_path)
    assert result.returncode == 0 and "usage: sparsevd-compare" in result.stdout and "RUN_DIR" in result.stdout
