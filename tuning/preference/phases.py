"""Where an online RL step's time goes: sampling the answers, scoring them with the rewards, the log-prob forwards
without gradients (the reference's, and the old policy's where the trainer keeps one), and the policy update (its
forward, backward and optimizer step: the rest of the step). Mixed into a TRL online trainer (RLOO, GRPO) before
it: align.py's trainers report the phases in metrics.json and in one closing line, and the throughput benchmark
times TRL's own trainers with the same clock.

    class Timed(PhaseTimes, RLOOTrainer): ...
    trainer.phase_seconds   # {"sampling": s, "rewards": s, "reference": s, "update": s}, training steps only
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from transformers import TrainerCallback

# The phases of a step, in the order they run, and what the closing line calls them.
PHASES = {"sampling": "sampling", "rewards": "reward scoring", "reference": "reference and old-policy log-probs",
          "update": "policy update"}


class PhaseTimes:
    """Seconds of each of PHASES in this session's training steps (evaluation is not counted), and the tokens
    sampled meanwhile. On an accelerator each phase ends with a synchronization, so its time is its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self.generated_tokens = 0
        self._in_step = False
        self.add_callback(_StepClock(self))

    def _synchronize(self) -> None:
        device = self.args.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    @contextmanager
    def timed(self, phase: str):
        if not self._in_step:
            yield
            return
        self._synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.phase_seconds[phase] += time.perf_counter() - started

    def _generate(self, prompts: list):
        with self.timed("sampling"):
            out = super()._generate(prompts)
        if self._in_step:
            self.generated_tokens += sum(map(len, out[1]))  # (prompt ids, completion ids, ...) in RLOO and GRPO
        return out

    def _calculate_rewards(self, *args, **kwargs):
        with self.timed("rewards"):
            return super()._calculate_rewards(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        if torch.is_grad_enabled():  # the policy's own forward, for the loss: part of the update
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        with self.timed("reference"):
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)


class _StepClock(TrainerCallback):
    """Times each optimizer step; what the other phases leave of it is the update."""

    def __init__(self, trainer: PhaseTimes):
        self.trainer, self.started, self.inner = trainer, 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._synchronize()
        self.inner = sum(trainer.phase_seconds[p] for p in PHASES if p != "update")
        trainer._in_step, self.started = True, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._synchronize()
        step = time.perf_counter() - self.started
        inner = sum(trainer.phase_seconds[p] for p in PHASES if p != "update") - self.inner
        trainer.phase_seconds["update"] += max(0.0, step - inner)
        trainer._in_step = False


def shares(seconds: dict) -> dict:
    """Each phase's share of their total."""
    total = sum(seconds.values())
    return {phase: value / total if total else 0.0 for phase, value in seconds.items()}


def share_line(seconds: dict, generated_tokens_per_second: float) -> str:
    """The closing line: where the steps' time went, and the sampling speed."""
    parts = ", ".join(f"{share:.0%} {PHASES[phase]}" for phase, share in shares(seconds).items())
    return f"Time in the steps: {parts}; {generated_tokens_per_second:.0f} sampled tokens/s"
