"""Shared fixtures: a tokenizer the project builds itself, and the optional ../shared assets."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_path(*parts) -> Path:
    """A ../shared asset, or skip the test when a fresh clone has none."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (only in CI and the dev workplace)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tuning import smoke

    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in smoke.make_records(300)]
    texts += ["### Instruction:\n### Input:\n### Response:\nBelow is an instruction that describes a task."]
    return smoke.build_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("gpt2-tokenizer"))


@pytest.fixture(scope="session")
def smoke_trained(tmp_path_factory):
    """A directory where `python train.py --smoke` has run in full (about 90 s on 2 cores); shared by tests."""
    path = tmp_path_factory.mktemp("learn")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--smoke"], cwd=path, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return path


@pytest.fixture(scope="session")
def distilgpt2_sft(tmp_path_factory):
    """An SFT directory of the real DistilGPT2 architecture: `train.py --init scratch --model
    ../shared/distilgpt2-config --max-steps 2` on real Alpaca records (random weights, real cost)."""
    config, data = shared_path("distilgpt2-config"), shared_path("data", "alpaca_5000.json")
    path = tmp_path_factory.mktemp("distilgpt2-sft")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init", "scratch", "--model", str(config),
                             "--dataset", str(data), "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
                             "--val-size", "8", "--max-length", "256", "--output-dir", str(path / "out")],
                            cwd=path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return path / "out"


@pytest.fixture(scope="session")
def smoke_chat(smoke_trained):
    """stdout of `python train.py --smoke --format messages` (about 25 s), run in the smoke_trained directory: the
    smoke SFT model learns the smoke tasks as conversations, with a two-turn task, into smoke-run/chat/."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--smoke", "--format", "messages"],
                            cwd=smoke_trained, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="session")
def smoke_reward(smoke_trained):
    """(directory, stdout): `python reward.py --smoke` has run in the smoke_trained directory (about 20 s)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "reward.py"), "--smoke"], cwd=smoke_trained, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return smoke_trained, result.stdout


@pytest.fixture(scope="session")
def smoke_aligned(smoke_reward):
    """(directory, {method: stdout}): `python align.py --smoke` has run for DPO and for RLOO (about 45 s and 30 s)
    in the smoke_reward directory, into smoke-run/aligned-dpo/ and smoke-run/aligned-rloo/."""
    work, _ = smoke_reward
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    outputs = {}
    for method in ("dpo", "rloo"):
        result = subprocess.run([sys.executable, str(ROOT / "align.py"), "--smoke", "--method", method], cwd=work,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[method] = result.stdout
    return work, outputs


@pytest.fixture(scope="session")
def smoke_lora(smoke_trained):
    """stdout of `python train.py --smoke --lora --merge` (about a minute), run in the smoke_trained directory:
    LoRA on the smoke SFT model teaches it a new task, into smoke-run/lora/."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--smoke", "--lora", "--merge"],
                            cwd=smoke_trained, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="session")
def smoke_lora_dpo(smoke_aligned):
    """stdout of `python align.py --smoke --lora --merge --max-steps 20` (the README's; about 25 s), run in the
    smoke_aligned directory, into smoke-run/aligned-dpo-lora/."""
    work, _ = smoke_aligned
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "align.py"), "--smoke", "--lora", "--merge", "--max-steps",
                             "20"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# The Constitutional AI pipeline on the smoke preset, as the README gives it (after `train.py --smoke`).
CONSTITUTION_COMMANDS = (
    ("constitution.py", "--smoke", "--stage", "revise"),
    ("train.py", "--smoke", "--dataset", "smoke-run/constitution/revisions.jsonl", "--output-dir", "smoke-run/sl-cai"),
    ("constitution.py", "--smoke", "--stage", "label"),
    ("align.py", "--smoke", "--dataset", "smoke-run/constitution/pairs.jsonl", "--output-dir", "smoke-run/rl-cai"),
)


@pytest.fixture(scope="session")
def smoke_constitution(smoke_trained):
    """(directory, [stdout of each command]): CONSTITUTION_COMMANDS have run in the smoke_trained directory (about
    a minute): SL-CAI into smoke-run/sl-cai/, the AI-labelled pairs' DPO into smoke-run/rl-cai/."""
    return smoke_trained, run_commands(smoke_trained, CONSTITUTION_COMMANDS, timeout=300)


def run_commands(cwd, commands, timeout: int) -> list[str]:
    """Each (script, *args) of `commands` run in `cwd`, one after the other, as a user runs them; their stdout.
    A failing one fails the fixture with its stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    outputs = []
    for script, *args in commands:
        result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, (script, args, result.stderr[-3000:])
        outputs.append(result.stdout)
    return outputs


# Verifiable rewards on the smoke preset, as the README gives them (after `train.py --smoke`): the smoke SFT model
# taught the arithmetic task (half its sums forget the carry), then GRPO rewarded for the right sum.
ARITHMETIC_COMMANDS = (
    ("train.py", "--smoke", "--dataset", "smoke-run/arithmetic.json", "--output-dir", "smoke-run/arithmetic"),
    ("align.py", "--smoke", "--method", "grpo", "--reward", "exact", "--model", "smoke-run/arithmetic", "--dataset",
     "smoke-run/arithmetic-prompts.json", "--output-dir", "smoke-run/aligned-grpo-exact"),
)


@pytest.fixture(scope="session")
def smoke_arithmetic(smoke_trained):
    """(directory, [stdout of each command]): ARITHMETIC_COMMANDS have run in the smoke_trained directory (about
    90 s): the arithmetic SFT model in smoke-run/arithmetic/, GRPO's in smoke-run/aligned-grpo-exact/."""
    return smoke_trained, run_commands(smoke_trained, ARITHMETIC_COMMANDS, timeout=400)
