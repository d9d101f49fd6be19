"""The pieces train.py adds to the Hugging Face Trainer: real-token counting, a clean stop on Ctrl-C,
the template saved with every checkpoint, and the loss-curve plot."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

import torch
from transformers import Trainer, TrainerCallback

from rundir import TEMPLATE_FILE, write_json


class _PackedBatchWarningFilter(logging.Filter):
    """Packed batches carry no attention_mask on purpose (position_ids keep the examples apart)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_PackedBatchWarningFilter())


class InstructTrainer(Trainer):
    """Trainer that counts the real (non-pad) tokens it trains on (the collator reports them per batch), and
    whose evaluation loss is the mean over all response tokens, as in evaluation.py, not a mean of batch means
    (which would change with --batch-size)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._real_tokens = 0
        self._eval_sums = torch.zeros(2, dtype=torch.float64)  # summed loss, loss tokens

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._real_tokens += int(inputs.pop("num_real_tokens", 0))
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop("num_real_tokens", None)
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if loss is not None and "labels" in inputs:
            n = int((inputs["labels"][:, 1:] != -100).sum())  # the batch loss is the mean over these tokens
            self._eval_sums += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        return loss, logits, labels

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_sums.zero_()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        sums = self.accelerator.reduce(self._eval_sums.to(self.args.device), reduction="sum").cpu()
        if sums[1] > 0:  # Trainer.evaluate logs the metrics after this, so the log has the per-token mean too
            output.metrics[f"{metric_key_prefix}_loss"] = float(sums[0] / sums[1])
        return output

    def real_tokens_total(self) -> int:
        """Real tokens trained on in this session, summed over all processes."""
        count = torch.tensor(self._real_tokens, device=self.args.device)
        return int(self.accelerator.reduce(count, reduction="sum").item())

    def peak_memory_mb(self) -> float:
        if self.args.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class StopOnSignal(TrainerCallback):
    """Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and stops; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self.stopped = False

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort) ...", flush=True)

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor(int(requested), device=args.device)  # every rank must stop at the same step
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control


class TemplateSaver(TrainerCallback):
    """Writes the prompt template beside every checkpoint, so inference formats prompts the same way."""

    def __init__(self, name: str):
        self.name = name

    def write(self, directory: str) -> None:
        from datasetup import TEMPLATES

        write_json(os.path.join(directory, TEMPLATE_FILE), {"name": self.name, **TEMPLATES[self.name]._asdict()})

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


def plot_loss_curve(log_history: list[dict], loss_before: float, path: str) -> None:
    """Train and eval loss against step, with the base model's eval loss at step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(0, loss_before)] + [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    ax.plot(*zip(*evals), "o-", label="validation loss", color="tab:orange")
    ax.annotate("base model", evals[0], textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
