"""What a training run leaves in its output directory, and how it is read back.

Ground floor: training, generation and evaluation all import this module, and it imports none of them.
"""

from __future__ import annotations

import hashlib
import json
import os

TEMPLATE_FILE = "sft_template.json"  # the prompt template, beside the model and in every checkpoint
RUN_CONFIG_FILE = "run_config.json"  # every resolved setting of the run
HELD_OUT_FILE = "held_out.jsonl"  # the validation records the run held out, exactly as read


def write_json(path: str, data: dict) -> None:
    """Write JSON atomically: never a half-written file after a kill."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.replace(tmp, path)


def write_records(path: str, records: list[dict]) -> str:
    """Write records as JSON lines, atomically; returns the file's sha256."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return hashlib.sha256(text.encode()).hexdigest()


def run_file(run_dir: str, name: str) -> str:
    """The path of `name` in a run dir; for a checkpoint-N inside a run, the run's copy when the checkpoint
    has none (checkpoints hold the model and template, not run_config.json or the held-out records)."""
    path = os.path.join(run_dir, name)
    inner = os.path.normpath(run_dir)
    if not os.path.exists(path) and os.path.basename(inner).startswith("checkpoint-"):
        return os.path.join(os.path.dirname(inner), name)
    return path


def find_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-N (trainer_state.json is written last, so a killed save is skipped)."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(name.split("-")[1]), name) for name in os.listdir(output_dir)
                   if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
                   and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")))
    return os.path.join(output_dir, steps[-1][1]) if steps else None


def read_run_config(run_dir: str) -> dict | None:
    path = run_file(run_dir, RUN_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def check_same_run(output_dir: str, config: dict, identity: tuple[str, ...]) -> None:
    """Refuse to resume into an output dir that holds another run (one whose `identity` settings differ)."""
    from cli import UserError

    saved = read_run_config(output_dir)
    if saved is None:
        return
    diffs = [f"{k}: {saved.get(k)!r} there, {config[k]!r} now" for k in identity if saved.get(k) != config[k]]
    if diffs:
        raise UserError(f"{output_dir}/ holds a different run ({'; '.join(diffs)}). Use another --output-dir, "
                        "or --no-resume to start over in this one.")


def clear_checkpoints(output_dir: str) -> None:
    """--no-resume: delete the checkpoints of an earlier run."""
    import shutil

    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(output_dir, name))
