"""What every training script here adds to the Hugging Face Trainer: real-token counting, run totals
that survive a resume, a guard against NaN, a clean stop on Ctrl-C or SIGTERM, evaluations that give every
process the same number of batches, and where the Trainer logs (--report-to)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time

import torch
from transformers import Trainer, TrainerCallback

from tuning import rundir


class _PackedBatchWarningFilter(logging.Filter):
    """Packed batches carry no attention_mask on purpose (position_ids keep the examples apart)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


class _TiedHeadWarningFilter(logging.Filter):
    """Resuming a model whose output layer shares the embedding weights (GPT-2) "misses" lm_head.weight:
    it is not saved separately, and is tied again on load. Nothing is lost, so say nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "missing keys in the checkpoint model loaded: ['lm_head.weight']" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_PackedBatchWarningFilter())
logging.getLogger("transformers.trainer").addFilter(_TiedHeadWarningFilter())


class NonFiniteLoss(RuntimeError):
    """The training loss or gradient became NaN or inf; raised before the optimizer step, so no NaN weights."""


class RunLayer:
    """Mixed into every trainer here (first among the bases, before a Hugging Face or TRL Trainer). It

    - counts the real (non-pad) tokens it trains on, and the trainer's other COUNTS (batch_counts);
    - keeps the run's totals (loss sum, the counts, runtime) in every checkpoint, so a resumed run
      reports the whole run, not its last session;
    - stops at the first non-finite loss or gradient, before the optimizer step can spread it;
    - gives evaluations this process's share of a held-out set (evaluation_batches) and reports them;
    - writes `checkpoint_files(directory)` (the template, ...) into each checkpoint before its state.
    """

    # Counts the collator reports per batch (popped before the forward), and their names in the run totals.
    COUNTS = {"num_real_tokens": "real_tokens"}

    def __init__(self, *args, checkpoint_files=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_files = checkpoint_files
        counts = dict.fromkeys(self.COUNTS.values(), 0)
        self._session = {"loss_sum": 0.0, **counts}  # this process, this session
        self.prior = {"loss_sum": 0.0, **counts, "runtime_s": 0.0}  # the run before this session
        self._step_loss = None  # this optimizer step's loss so far, a tensor: checked once per step, no sync before
        self._started, self._train_seconds = time.perf_counter(), None
        self._grad_norm = None  # this step's gradient norm, from the Trainer's clipping
        self.add_callback(_NonFiniteGuard(self))

    # ---------------------------------------------------------------- training
    def batch_counts(self, inputs) -> dict:
        """This batch's COUNTS by their run-total names, popped from the batch (the collator reports them)."""
        return {name: int(inputs.pop(key, 0)) for key, name in self.COUNTS.items()}

    def training_step(self, model, inputs, num_items_in_batch=None):
        for name, count in self.batch_counts(inputs).items():
            self._session[name] += count
        loss = super().training_step(model, inputs, num_items_in_batch)
        step_loss = loss.detach().float()
        self._step_loss = step_loss if self._step_loss is None else self._step_loss + step_loss
        return loss

    def _clip_grad_norm(self, model):
        self._grad_norm = super()._clip_grad_norm(model)  # kept for the NaN guard, which needs no second pass
        return self._grad_norm

    def non_finite(self, what: str, value: float) -> NonFiniteLoss:
        step, lr = self.state.global_step + 1, self._get_learning_rate()
        precision = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32"
        hint = "try --precision fp32, or a lower --lr" if precision == "fp16" else "try a lower --lr"
        return NonFiniteLoss(f"the training {what} became {value} at step {step} (learning rate {lr:.3g}, "
                             f"precision {precision}); nothing of this step was kept. {hint}, and run again "
                             "(with --no-resume, or from the last good checkpoint with the same settings)")

    def train(self, resume_from_checkpoint=None, **kwargs):
        self._started, self._train_seconds = time.perf_counter(), None
        if resume_from_checkpoint:
            saved = rundir.read_json(os.path.join(resume_from_checkpoint, rundir.TOTALS_FILE))
            self.prior.update(saved or {})
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._train_seconds = time.perf_counter() - self._started  # the final evaluation and save don't count
        return result

    def run_totals(self) -> dict:
        """The whole run so far: loss sum (mean over processes), the COUNTS (summed), runtime. A collective."""
        names = list(self.COUNTS.values())
        here = torch.tensor([float(self._session["loss_sum"])] + [self._session[n] for n in names],
                            dtype=torch.float64, device=self.args.device)
        loss_sum = float(self.accelerator.reduce(here[:1].clone(), reduction="mean").item())
        counts = self.accelerator.reduce(here[1:].clone(), reduction="sum").tolist()
        seconds = self._train_seconds if self._train_seconds is not None else time.perf_counter() - self._started
        return {"loss_sum": self.prior["loss_sum"] + loss_sum, "runtime_s": self.prior["runtime_s"] + seconds,
                **{name: self.prior.get(name, 0) + int(count) for name, count in zip(names, counts)}}

    def _save_checkpoint(self, model, trial):
        totals = self.run_totals()  # every process gets here, as a collective needs
        if self.args.should_save:
            directory = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            os.makedirs(directory, exist_ok=True)
            rundir.write_json(os.path.join(directory, rundir.TOTALS_FILE), totals)
            if self.checkpoint_files:
                self.checkpoint_files(directory)
        super()._save_checkpoint(model, trial)  # trainer_state.json last: a checkpoint is complete with it

    # ---------------------------------------------------------------- evaluation
    def evaluation_batches(self, dataset=None):
        """This process's share of `dataset` (default: the eval set), every world_size-th example so none is
        counted twice, as (batch ready for the model, real) pairs: the first `real` examples of the batch are the
        share's, the rest padding. Every process gets the same number of batches, since under FSDP each forward
        is a collective that waits for every process: a share one example short is filled up with a copy of an
        example (blank_example: one that carries no loss), which the figures must leave out. While the batches
        are consumed the model is in eval mode, under no_grad and the run's autocast; consume them all (the
        training mode comes back at the end)."""
        from torch.utils.data import DataLoader

        dataset = dataset if dataset is not None else self.eval_dataset
        self.on_device()
        rank, world, size = self.args.process_index, self.args.world_size, self.args.per_device_eval_batch_size
        mine = range(rank, len(dataset), world)
        examples = [dataset[i] for i in mine]
        examples += [self.blank_example(dataset[0])] * (-(-len(dataset) // world) - len(examples))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                for start, batch in zip(range(0, len(examples), size),
                                        DataLoader(examples, batch_size=size, collate_fn=self.data_collator)):
                    for key in self.COUNTS:
                        batch.pop(key, None)
                    yield self._prepare_inputs(batch), max(0, min(size, len(mine) - start))
        finally:
            self.model.train(was_training)

    def on_device(self) -> None:
        """Under DeepSpeed the Trainer leaves the model where it loaded (the CPU) until train() hands it to the
        engine, while the evaluation before training and DPO's reference pass run it before that: on this
        process's device, as the engine will (ZeRO-1 and 2 keep whole weights in each process)."""
        parameter = next(self.model.parameters(), None)
        if parameter is not None and parameter.device != self.args.device and not parameter.is_meta:
            self.model.to(self.args.device)

    def blank_example(self, example: dict) -> dict:
        """A padding example for evaluation_batches: `example`, left out of the figures by the consumer."""
        return example

    def report_evaluation(self, metrics: dict) -> dict:
        """Log evaluation metrics and tell the callbacks, as Trainer.evaluate does; returns them. The model is in
        eval mode meanwhile: TRL's log() adds the running metrics of the mode that the model is in."""
        was_training = self.model.training
        self.model.eval()
        try:
            self.log(metrics)
        finally:
            self.model.train(was_training)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def peak_memory_mb(self) -> float:
        if self.args.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class InstructTrainer(RunLayer, Trainer):
    """The SFT Trainer: the run layer, and the evaluation loss as the mean over all response tokens, as
    evaluation.py reports it, not a mean of batch means (which would change with --batch-size)."""

    def blank_example(self, example: dict) -> dict:
        return {**example, "labels": [-100] * len(example["labels"])}  # no loss: adds nothing to the sums

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict:
        """The mean loss over every response token of the validation split, at any batch size and number of
        processes: each process takes every world_size-th example (none twice, unlike a padded sampler),
        and the summed losses and token counts are added up once at the end."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        started = time.perf_counter()
        for batch, _ in self.evaluation_batches(eval_dataset):
            n = (batch["labels"][:, 1:] != -100).sum()  # the model's loss is the mean over these tokens
            loss = self.model(**batch).loss.double()
            sums += torch.stack([loss * n if n > 0 else torch.zeros_like(loss), n.double()])
        sums = self.accelerator.reduce(sums, reduction="sum")
        return self.report_evaluation({f"{metric_key_prefix}_loss": float(sums[0] / sums[1].clamp(min=1)),
                                       f"{metric_key_prefix}_runtime": round(time.perf_counter() - started, 4)})


class _NonFiniteGuard(TrainerCallback):
    """Before each optimizer step, a NaN or inf loss (or, except under fp16, whose loss scaler skips such
    steps on purpose, gradient norm) stops the run: nothing of that step reaches the weights. One check
    a step, taken by every process together, so none is left waiting in a collective."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        loss = trainer._step_loss if trainer._step_loss is not None else torch.zeros((), device=args.device)
        trainer._step_loss = None
        norm, trainer._grad_norm = trainer._grad_norm, None
        grads = [] if args.fp16 or norm is not None or model is None else [
            p.grad for p in model.parameters() if p.grad is not None]  # no clipping (max_grad_norm 0): one pass
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        if args.fp16 or norm is None:  # fp16: inf gradients are the loss scaler's business
            norm = 0.0
        norm = torch.as_tensor(norm, dtype=torch.float32, device=loss.device)
        values = torch.stack([loss, norm])
        bad = (~torch.isfinite(values)).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.any():  # the one sync of the step
            what, index = ("loss", 0) if bad[0] else ("gradient norm", 1)
            raise trainer.non_finite(what, float(values[index]) if not math.isfinite(values[index]) else math.nan)
        trainer._session["loss_sum"] += loss  # a tensor: read when the totals are needed


class StopOnSignal(TrainerCallback):
    """Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and stops; a second one aborts."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.stopped = False
        self.signal = None  # the signal that asked for the stop
        self.announce = announce  # False on all but the main process, so the note is printed once

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested, self.signal = True, signum
            if self.announce:
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


def report_targets(report_to: str, output_dir: str) -> list[str]:
    """--report-to as the Trainer's report_to list. TensorBoard's logs go to OUTPUT_DIR/runs/<time>_<host>/
    from the first log on (transformers would put those of the evaluation before training in ./runs)."""
    import os

    from transformers.integrations.integration_utils import default_logdir

    global _tensorboard_dir
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if {"tensorboard", "all"} & set(names) and os.environ.get("TENSORBOARD_LOGGING_DIR") in (None, _tensorboard_dir):
        _tensorboard_dir = os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(output_dir, default_logdir())
    return names  # (a TENSORBOARD_LOGGING_DIR set by the user is kept; ours is replaced at each run)


_tensorboard_dir = None  # the TENSORBOARD_LOGGING_DIR set by report_targets
