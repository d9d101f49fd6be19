"""What a training run leaves in its output directory, and how it is read back.

Floor 0, with cli: every other floor reads a run through this module, and it imports cli only. It knows the
files of a run, which checkpoint a resume can trust (in each launcher's layout), whether a run is finished or
extended, the identity that keeps two runs from mixing, and the lock that keeps two processes apart.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import zipfile

from tuning.cli import UserError

TEMPLATE_FILE = "sft_template.json"  # the prompt template, beside the model and in every checkpoint
RUN_CONFIG_FILE = "run_config.json"  # every resolved setting of the run
HELD_OUT_FILE = "held_out.jsonl"  # the validation records the run held out, exactly as read
METRICS_FILE = "metrics.json"  # written last: its presence marks a finished run
TOTALS_FILE = "run_totals.json"  # in each checkpoint: loss sum, real tokens and runtime of the run so far
LOCK_FILE = ".run.lock"  # held (flock) by the process that trains into the directory
STATE_FILE = "trainer_state.json"  # the Trainer writes it last into a checkpoint
# A model's weights, as the Trainer saves them (whole, or as an adapter).
WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin"}
MERGED_DIR = "merged"  # --lora --merge: the merged full weights, inside the output dir
# Files of an earlier run that --no-resume deletes besides the checkpoints: its results and final model,
# so nothing stale sits beside the new run (tokenizer files are rewritten at the end of each run).
RUN_OUTPUTS = ("eval_before.json", METRICS_FILE, "loss_curve.png", "config.json", "generation_config.json",
               TEMPLATE_FILE, "adapter_config.json", "model.safetensors.index.json", *sorted(WEIGHT_FILES))


class RunStop(UserError):
    """A run that ends early for a reason the user can act on; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def write_json(path: str, data: dict) -> None:
    """Write JSON atomically: never a half-written file after a kill."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def records_sha256(records: list[dict]) -> str:
    """The sha256 of the JSON-lines file write_records makes of `records`."""
    return hashlib.sha256(_jsonl(records).encode()).hexdigest()


def write_records(path: str, records: list[dict]) -> None:
    """Write records as JSON lines, atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(_jsonl(records))
    os.replace(tmp, path)


def read_records(path: str) -> list[dict]:
    """The records of a JSON-lines file written by write_records."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run_file(run_dir: str, name: str) -> str:
    """The path of `name` in a run dir; for a checkpoint-N inside a run, the run's copy when the checkpoint
    has none (checkpoints hold the model and template, not run_config.json or the held-out records)."""
    path = os.path.join(run_dir, name)
    inner = os.path.normpath(run_dir)
    if not os.path.exists(path) and os.path.basename(inner).startswith("checkpoint-"):
        return os.path.join(os.path.dirname(inner), name)
    return path


def read_run_config(run_dir: str) -> dict | None:
    return read_json(run_file(run_dir, RUN_CONFIG_FILE))


def starting_model(run_dir: str) -> str | None:
    """The model a run started from, as its run_config.json names it: an align.py run's SFT model (sft_model), a
    train.py run's --model (model_path: absolute for a local dir; older runs name it as given). None for a run
    from random weights (--init scratch), or a dir without a run config."""
    config = read_run_config(run_dir) or {}
    if config.get("sft_model"):
        return config["sft_model"]
    if config.get("init") == "scratch":
        return None
    return config.get("model_path") or config.get("model")


def model_path(path: str) -> str:
    """A local model dir as an absolute path (so a run config names it from any working dir); a Hub id as is."""
    return os.path.abspath(path) if os.path.isdir(path) else path


# ---------------------------------------------------------------- checkpoints
def checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N directories, newest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(((int(name.split("-")[1]), name) for name in os.listdir(output_dir)
                    if name.startswith("checkpoint-") and name.split("-")[1].isdigit()), reverse=True)
    return [os.path.join(output_dir, name) for _, name in steps]


def damaged_file(checkpoint: str) -> str | None:
    """The first file of `checkpoint` that would not load on resume (None when all do).

    A save killed part-way lacks trainer_state.json, which the Trainer writes last; a full disk or a
    copy cut short leaves truncated files, found here without loading them: a safetensors file must be
    as long as its header says, a torch .pt/.pth/.bin file must be a complete zip archive, JSON must parse.
    """
    if not os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
        return STATE_FILE
    missing = _missing_file(checkpoint)
    if missing:
        return missing
    deepspeed = [name for name in os.listdir(checkpoint) if name.startswith(DEEPSPEED_STEP)
                 and os.path.isdir(os.path.join(checkpoint, name))]
    for name in sorted(os.listdir(checkpoint)) + [os.path.join(d, n) for d in deepspeed
                                                   for n in sorted(os.listdir(os.path.join(checkpoint, d)))]:
        path = os.path.join(checkpoint, name)
        try:
            if name.endswith(".safetensors"):
                with open(path, "rb") as handle:
                    header_size = int.from_bytes(handle.read(8), "little")
                    header = json.loads(handle.read(header_size))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if os.path.getsize(path) != 8 + header_size + end:
                    return name
            elif name.endswith((".pt", ".pth", ".bin")):
                with zipfile.ZipFile(path) as archive:
                    archive.infolist()
            elif name.endswith(".json"):
                with open(path, encoding="utf-8") as handle:
                    json.load(handle)
        except (OSError, ValueError, zipfile.BadZipFile):
            return name
    return None


# What the Trainer writes into a checkpoint besides its weights, by launcher (Trainer._save_checkpoint and
# _save_optimizer_and_scheduler, transformers 5.24), and what its resume reads back:
DEEPSPEED_STEP = "global_step"  # DeepSpeed: global_stepN/ holds every rank's model and optimizer states ...
DEEPSPEED_LATEST = "latest"  # ... and `latest`, written last by DeepSpeed, names it
FSDP_MODEL = ("pytorch_model_fsdp.bin", "pytorch_model_fsdp_0")  # FSDP: the model, full (a file) or sharded (a dir)
FSDP_OPTIMIZER = ("optimizer.bin", "optimizer_0")  # FSDP: the optimizer, full or sharded
DCP_DONE = ".metadata"  # written last into a sharded (torch.distributed.checkpoint) dir
OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "scheduler.pt"  # one process or DDP (FSDP: the scheduler too)


def checkpoint_layout(checkpoint: str) -> str:
    """Which launcher wrote `checkpoint`: "deepspeed", "fsdp" or "plain" (one process, DDP)."""
    names = set(os.listdir(checkpoint))
    if DEEPSPEED_LATEST in names or any(name.startswith(DEEPSPEED_STEP) for name in names):
        return "deepspeed"
    return "fsdp" if names & {*FSDP_MODEL, *FSDP_OPTIMIZER} else "plain"


def _missing_file(checkpoint: str) -> str | None:
    """A file that resume needs and that is not there, in the checkpoint's layout. Without its optimizer or
    scheduler state, the Trainer would quietly start both afresh at a later step.

    - DeepSpeed: `latest` and the global_stepN/ it names, with model and optimizer states (the weights file
      depends on the ZeRO stage and scheduler.pt on the DeepSpeed config: resume reads neither);
    - FSDP: the model and the optimizer, each a file (FULL_STATE_DICT) or a finished sharded dir
      (SHARDED_STATE_DICT), and scheduler.pt;
    - one process or DDP: the weights (every shard of an index), optimizer.pt and scheduler.pt.
    """
    names = set(os.listdir(checkpoint))
    layout = checkpoint_layout(checkpoint)
    if layout == "deepspeed":
        if DEEPSPEED_LATEST not in names:
            return DEEPSPEED_LATEST
        try:
            with open(os.path.join(checkpoint, DEEPSPEED_LATEST), encoding="utf-8") as handle:
                step = handle.read().strip()
        except OSError:
            return DEEPSPEED_LATEST
        step_dir = os.path.join(checkpoint, step)
        states = os.listdir(step_dir) if step.startswith(DEEPSPEED_STEP) and os.path.isdir(step_dir) else []
        for kind in ("model_states.pt", "optim_states.pt"):
            if not any(name.endswith(kind) for name in states):
                return f"{step or DEEPSPEED_STEP + 'N'}/*{kind}"
        # Each rank writes its optimizer shard (zero_pp_rank_R_...): ranks 0 to the run's world size - 1.
        ranks = {int(match.group(1)) for name in states if (match := re.search(r"zero_pp_rank_(\d+)_.*_optim_states", name))}
        world = (read_run_config(os.path.dirname(os.path.normpath(checkpoint))) or {}).get("world_size") or max(ranks) + 1
        missing = sorted(set(range(world)) - ranks)
        return f"{step}/the optimizer states of rank {missing[0]}" if missing else None
    if layout == "fsdp":
        for whole, sharded in (FSDP_MODEL, FSDP_OPTIMIZER):
            if not (os.path.isfile(os.path.join(checkpoint, whole))
                    or os.path.isfile(os.path.join(checkpoint, sharded, DCP_DONE))):
                return f"{sharded}/{DCP_DONE}" if sharded in names else whole
        return None if SCHEDULER_FILE in names else SCHEDULER_FILE
    index = next((n for n in names if n.endswith(".safetensors.index.json")), None)
    if index:
        try:
            with open(os.path.join(checkpoint, index), encoding="utf-8") as handle:
                shards = set(json.load(handle)["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return index
        missing_shard = next((shard for shard in sorted(shards) if shard not in names), None)
        if missing_shard:
            return missing_shard
    elif not names & WEIGHT_FILES:
        return "model.safetensors"
    return next((name for name in (OPTIMIZER_FILE, SCHEDULER_FILE) if name not in names), None)


def find_checkpoint(output_dir: str, warn=None) -> str | None:
    """The newest checkpoint whose every file loads. Damaged newer ones are skipped, with a warning
    through `warn` (when given) that names the damaged file."""
    for checkpoint in checkpoints(output_dir):
        bad = damaged_file(checkpoint)
        if bad is None:
            return checkpoint
        if warn and bad != STATE_FILE:  # a save cut short by a kill is routine, a damaged file is not
            state = "missing" if not os.path.exists(os.path.join(checkpoint, bad)) else "damaged (truncated?)"
            warn(f"warning: skipping {checkpoint}: {bad} is {state}; using an older checkpoint")
    return None


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Delete checkpoint dirs newer than the newest complete one (a save cut short); returns them."""
    import shutil

    removed = []
    for checkpoint in checkpoints(output_dir):
        if damaged_file(checkpoint) is None:
            break
        shutil.rmtree(checkpoint, ignore_errors=True)
        removed.append(checkpoint)
    return removed


# ---------------------------------------------------------------- a run's identity and lifecycle
# The settings of a run's length: a run may be extended (longer), never changed otherwise.
LENGTH = ("max_steps", "epochs")


def check_same_run(output_dir: str, config: dict, identity: tuple[str, ...]) -> bool:
    """Refuse to resume into an output dir that holds another run (one whose `identity` settings differ). A run
    made longer (a higher --max-steps or --epochs, all else the same) is the same run, extended: returns True
    for it, and its run config keeps the lengths it had before (`extended`)."""
    saved = read_run_config(output_dir)
    if saved is None:
        return False
    # A setting the saved run does not name was added to the script after it started: not a difference.
    changed = [k for k in identity if saved.get(k, config[k]) != config[k]]
    if changed and set(changed) <= set(LENGTH) and _longer(saved, config, output_dir):
        config["extended"] = [*saved.get("extended", []), {"global_step": _last_step(output_dir),
                                                           **{k: saved.get(k) for k in LENGTH}}]
        return True
    config.setdefault("extended", saved.get("extended", []))
    diffs = [f"{k}: {saved[k]!r} there, {config[k]!r} now" for k in changed]
    if diffs:
        finished = finished_step(output_dir) is not None
        hint = ("Use another --output-dir: this one holds a finished model, which --no-resume would delete" if finished
                else "Use another --output-dir, or --no-resume to start over in this one")
        raise UserError(f"{output_dir}/ holds a different run ({'; '.join(diffs)}). {hint}.")


def _last_step(output_dir: str) -> int:
    """The step a run in `output_dir` reached: its final step if finished, else its newest checkpoint's."""
    finished = finished_step(output_dir)
    if finished is not None:
        return finished
    newest = find_checkpoint(output_dir)
    return int(newest.rsplit("-", 1)[1]) if newest else 0


def _longer(saved: dict, config: dict, output_dir: str) -> bool:
    """Does `config` ask for more training than the saved run: more --max-steps than it had (or, set by its
    epochs, than the step it reached), or more --epochs where both are set by epochs?"""
    if config["max_steps"] > 0:
        return config["max_steps"] > (saved["max_steps"] if saved["max_steps"] > 0 else _last_step(output_dir))
    return saved["max_steps"] <= 0 and config["epochs"] > saved["epochs"]


def finished_step(output_dir: str, config: dict | None = None) -> int | None:
    """The final step of a finished run in `output_dir` (it wrote metrics.json last), else None. With the run's
    `config`: None as well when metrics.json is that of a shorter run this one extends (its run_length)."""
    metrics = read_json(os.path.join(output_dir, METRICS_FILE))
    if metrics is None:
        return None
    length = metrics.get("run_length")
    if config is not None and length is not None and any(length.get(k) != config.get(k) for k in LENGTH):
        return None
    return metrics.get("global_step")


def record_run_length(output_dir: str, lengths: dict) -> None:
    """Write the lengths (max_steps, epochs) a finished run had into its metrics.json (runs finished before
    metrics.json named them), so that an extension interrupted before it ends is not taken for finished."""
    path = os.path.join(output_dir, METRICS_FILE)
    metrics = read_json(path)
    if metrics is not None and "run_length" not in metrics:
        write_json(path, {**metrics, "run_length": {k: lengths.get(k) for k in LENGTH}})


def clear_run(output_dir: str) -> list[str]:
    """--no-resume: delete the checkpoints and results of an earlier run; returns what was deleted."""
    import shutil

    removed = checkpoints(output_dir) + [path for path in [os.path.join(output_dir, MERGED_DIR),
                                                           os.path.join(output_dir, "runs")] if os.path.isdir(path)]
    for directory in removed:
        shutil.rmtree(directory)
    shards = [n for n in os.listdir(output_dir) if n.startswith("model-") and n.endswith(".safetensors")] \
        if os.path.isdir(output_dir) else []
    for name in (*RUN_OUTPUTS, *shards):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def lock(output_dir: str):
    """Hold an OS lock on `output_dir` for the rest of the process, or refuse: another process trains there.

    The kernel drops a flock when its process dies, so a run killed with kill -9 never blocks the next.
    Returns the open lock file (keep it referenced).
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; two runs there are not detected
        return None
    os.makedirs(output_dir, exist_ok=True)
    handle = open(os.path.join(output_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):  # e.g. ENOLCK: no locks on NFS
            print(f"warning: {output_dir}/ can't be locked ({error.strerror}); two runs into it would not be "
                  "noticed")
            return handle
        handle.seek(0)
        other = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{output_dir}/ is in use by another run (process {other}); wait for it to finish, "
                        "stop it, or use another --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
