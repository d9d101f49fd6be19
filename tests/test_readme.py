"""The README documents every flag, and CI runs the README's test command."""

import pytest

import constitution
import datasetup
import train
from conftest import ROOT
from tuning import cli

README = (ROOT / "README.md").read_text()


def test_readme_lists_every_train_data_and_constitution_flag():
    for module in (train, datasetup, constitution):
        for name, _, _ in cli.constant_specs(module):
            assert f"`{cli.flag_name(name)}" in README, f"{cli.flag_name(name)} ({module.__name__}) not in README"


def test_ci_runs_the_readme_test_command():
    command = "python -m pytest -q"
    assert f"\n{command}\n" in README
    assert f"\n{command}" in (ROOT / ".ci" / "run").read_text()


def test_every_directory_the_readme_writes_is_git_ignored():
    """A real-architecture run is over 1 GB: `git add .` after following the README must not pick one up."""
    import re
    import subprocess

    import align
    import reward

    if subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout (CI's clean clone is one)")
    written = set(re.findall(r"--output-dir ([\w./-]+)", README)) | {"smoke-run", "tokenized"}
    written |= {module.OUTPUT_DIR for module in (train, reward, align, constitution)}
    written -= {"/mnt/tiny/run"}  # (a tmpfs mounted for the full-disk trial, outside the checkout)
    for directory in sorted(written):
        result = subprocess.run(["git", "check-ignore", "-q", f"{directory.rstrip('/')}/model.safetensors"], cwd=ROOT)
        assert result.returncode == 0, f"{directory}/ is not in .gitignore"
