"""Every smoke figure the README quotes, rerun and compared: the real output it shows after `$ python ...`, the
report tables, and the counts in its prose. A figure that drifts (a fix that changes what a model learns, a
changed default) fails here until the README says what the code does. Timings (tokens/s, pairs/s, s/step) are
masked: they are the machine's, not the code's. Commands on ../shared data (real architectures) are not smoke
figures and are left out."""

import json
import re
import shlex
import subprocess
import sys

import pytest

from tuning.data import records
from tuning import smoke
from conftest import ARITHMETIC_COMMANDS, CONSTITUTION_COMMANDS, ROOT
from test_align_smoke import answers_to_held_out
from test_lora import held_out_exact_match
from test_train import ENV

README = (ROOT / "README.md").read_text()
# What varies with the machine: masked before comparing.
TIMINGS = [(re.compile(r"[\d.]+ (real tokens/s|pairs/s|answers/s|s/step|sampled tokens/s)"), r"<n> \1"),
           (re.compile(r"\d+% (sampling|reward scoring|reference and old-policy log-probs|policy update)"), r"<n>% \1"),
           (re.compile(r"\((tokenized|cached)\)$"), "(tokenized or cached)")]  # (whether an earlier run cached them)


def masked(line: str) -> str:
    for pattern, replacement in TIMINGS:
        line = pattern.sub(replacement, line)
    return line.rstrip()


def shown_runs() -> list[tuple[str, list[str]]]:
    """(command, the output the README shows for it) of each `$ ` line in a ```text block, in README order."""
    runs = []
    for block in re.findall(r"```text\n(.*?)```", README, re.S):
        for part in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *output = part.rstrip("\n").split("\n")
            runs.append((command, output))
    return runs


SMOKE_RUNS = [(command, output) for command, output in shown_runs() if "../shared" not in command]


def run(work, command: str) -> str:
    """A README command run in the smoke directory, as a user runs it; its stdout. `printf '...' | python ...`
    feeds the printf's text to the script's stdin."""
    stdin = None
    if command.startswith("printf "):
        typed, command = command.split(" | ", 1)
        stdin = shlex.split(typed)[1].encode().decode("unicode_escape")
    argv = shlex.split(command)
    assert argv[0] == "python", command
    if argv[1] == "inference.py":  # (no training: in this process, without an interpreter's start-up)
        return run_here(work, argv[1:], stdin)
    result = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=work, env=ENV,
                            capture_output=True, text=True, timeout=400, input=stdin)
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    return result.stdout


def run_here(work, argv: list[str], stdin: str | None) -> str:
    """A script run in this process as `python SCRIPT ARGS` runs it, in `work`, `stdin` as its input (a pipe, not
    a terminal); its stdout."""
    import contextlib
    import io
    import os
    import runpy

    saved = os.getcwd(), sys.argv, sys.stdin
    out = io.StringIO()
    os.chdir(work)
    sys.argv, sys.stdin = argv, io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    except SystemExit as stop:
        assert not stop.code, f"{shlex.join(argv)} exited with {stop.code}:\n{out.getvalue()[-3000:]}"
    finally:
        os.chdir(saved[0])
        sys.argv, sys.stdin = saved[1], saved[2]
    return out.getvalue()


def unshown(command: str, shown: list[str], actual: str) -> str:
    """"" when each line the README shows (but `...`, which elides) is in the real output, in the same order; else
    what is missing, and what the run printed."""
    lines = [masked(line) for line in actual.splitlines()]
    at = 0
    for line in (masked(line) for line in shown):
        if line in ("...", ""):
            continue
        if line not in lines[at:]:
            return f"`{command}`: the README shows {line!r}; the run printed:\n" + "\n".join(lines)
        at = lines.index(line, at) + 1
    return ""


@pytest.fixture(scope="module")
def work(smoke_aligned, smoke_lora, smoke_chat, smoke_constitution, smoke_arithmetic):
    """The smoke directory with every model the README's smoke commands read."""
    return smoke_aligned[0]


def test_every_shown_smoke_output_is_what_the_command_prints(work, smoke_reward, smoke_aligned, smoke_lora,
                                                            smoke_lora_dpo, smoke_chat, smoke_constitution,
                                                            smoke_arithmetic):
    """The blocks of real output, command by command, in README order (the order a user follows)."""
    ran = {"python reward.py --smoke": smoke_reward[1], "python align.py --smoke": smoke_aligned[1]["dpo"],
           "python align.py --smoke --method rloo": smoke_aligned[1]["rloo"],
           "python train.py --smoke --lora --merge": smoke_lora,
           "python align.py --smoke --lora --merge --max-steps 20": smoke_lora_dpo,
           "python train.py --smoke --format messages": smoke_chat,
           **{shlex.join(["python", *command]): out for command, out in zip(CONSTITUTION_COMMANDS,
                                                                             smoke_constitution[1])},
           **{shlex.join(["python", *command]): out for command, out in zip(ARITHMETIC_COMMANDS, smoke_arithmetic[1])}}
    # (shared fixtures ran these)
    assert len(SMOKE_RUNS) >= 10
    wrong = []
    for command, shown in SMOKE_RUNS:
        if command.startswith("cat "):  # a file the next commands read: made from what the README shows
            (work / command.split()[1]).write_text("\n".join(shown) + "\n")
            continue
        wrong.append(unshown(command, shown, ran[command] if command in ran else run(work, command)))
    assert not any(wrong), "\n\n".join(filter(None, wrong))


# ---------------------------------------------------------------- the report tables
def table_rows(text: str, header: str) -> list[str]:
    """The rows of the markdown table whose header row starts with `header`."""
    start = text.index(header)
    return [line for line in text[start:].split("\n\n")[0].splitlines() if line.startswith("|")]


@pytest.mark.parametrize("command,report,header", [
    ("python evaluation.py --smoke", "smoke-run/model/eval/report.md", "| metric | better | base | fine-tuned |"),
    ("python evaluation.py --base smoke-run/model --finetuned smoke-run/aligned-dpo --reward-model smoke-run/reward "
     "--num-generations 200 --max-new-tokens 32", "smoke-run/aligned-dpo/eval/report.md",
     "| metric | better | SFT | aligned |"),
])
def test_the_report_tables_are_the_reports(work, command, report, header):
    assert command in README
    run(work, command)
    written = (work / report).read_text()
    assert table_rows(README, header) == table_rows(written, header)
    win = re.search(r"\*\*Win rate of the aligned model over the SFT: [\d.]+%\*\* of \d+ prompts", written)
    if win:
        assert win.group(0) in " ".join(README.split())


# ---------------------------------------------------------------- the counts in the prose
def prose(text: str) -> str:
    return " ".join(text.split())


def test_the_counts_in_the_prose_are_what_the_models_do(work):
    held_out, _ = records.held_out_records(str(work / "smoke-run" / "model"))
    sft = answers_to_held_out(work / "smoke-run" / "model", held_out)
    dpo = answers_to_held_out(work / "smoke-run" / "aligned-dpo", held_out)
    rloo = answers_to_held_out(work / "smoke-run" / "aligned-rloo", held_out)
    text = prose(README)
    assert f"the SFT model answers {sft[0]} of its {sft[1]} held-out greetings politely" in text
    assert f"({sft[0]} of its {sft[1]} held-out greetings polite)" in text
    assert (f"DPO answers {dpo[0]} of {dpo[1]} politely, and so does RLOO against the reward model" in text
            if dpo[0] == rloo[0] else f"DPO answers {dpo[0]} of {dpo[1]} politely, and RLOO {rloo[0]}" in text)
    assert (f"they answer {dpo[2]} and {rloo[2]} of the other {sft[3]} held-out prompts exactly right, the SFT model "
            f"{sft[2]}") in text


def test_the_inference_summary_is_what_inference_prints(work):
    printed = run(work, "python inference.py --smoke")
    base = re.search(r"base: (\d+)/(\d+) answers stopped at EOS; exact match with the reference: (\d+)/\d+", printed)
    tuned = re.search(r"finetuned: (\d+)/(\d+) answers stopped at EOS; exact match with the reference: (\d+)/\d+",
                      printed)
    n = base.group(2)
    assert (f"On all {n} held-out smoke prompts (`python inference.py --smoke`): base {base.group(1)}/{n} stop at EOS "
            f"and {base.group(3)}/{n} exact matches; fine-tuned {tuned.group(1)}/{n} stop at EOS and "
            f"{tuned.group(3)}/{n} exact matches with the reference") in prose(README)


def test_the_reward_judged_evaluation_figures(work):
    command = ("python evaluation.py --smoke --reward-model smoke-run/reward --num-generations 40 --max-new-tokens 24"
               " --output-dir eval-readme")
    run(work, command)
    report = json.loads((work / "eval-readme" / "report.json").read_text())
    assert (f"the fine-tuned model's mean reward is {report['finetuned']['mean_reward']:.2f} against the base's "
            f"{report['base']['mean_reward']:.2f}, and it wins {report['win_rate']:.1%} of 40 prompts") in prose(README)


def test_the_lora_figures(work, smoke_lora):
    out, sft = work / "smoke-run" / "lora", work / "smoke-run" / "model"
    from tuning import rundir

    new = [r for r in rundir.read_records(str(out / rundir.HELD_OUT_FILE)) if r["instruction"] == smoke.NEW_TASK]
    old = [r for r in rundir.read_records(str(sft / rundir.HELD_OUT_FILE)) if r["instruction"] != smoke.GREETING]
    right = lambda model, records: round(held_out_exact_match(model, records) * len(records))  # noqa: E731
    text = prose(README)
    assert (f"the new task {right(sft, new)}/{len(new)} right before and {right(out, new)}/{len(new)} after; the old "
            f"tasks {right(sft, old)}/{len(old)} right before") in text
    assert f"and {right(out, old)}/{len(old)} after" in text or right(out, old) == right(sft, old)
