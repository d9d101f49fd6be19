"""What align.py reports once a run ends: metrics.json's held-out results before and after aligning and
the method's throughput, the before/after picture, and the closing lines."""

from __future__ import annotations

from tuning.preference import phases

# What the closing line calls each --loss-type's held-out loss (its values are not comparable across types).
LOSS_NAMES = {"sigmoid": "DPO", "ipo": "IPO", "hinge": "hinge", "robust": "robust DPO"}


def summary(args, trainer, before: dict, after: dict, metrics: dict) -> dict:
    """metrics.json's held-out results before and after aligning, and the method's throughput."""
    seconds, steps = metrics["train_runtime_s"], max(1, metrics["global_step"])
    names = ("accuracy", "loss", "mean_margin") if args.method == "dpo" else ("mean_reward", "kl", "truncated")
    held_out = {f"eval_{name}_{when}": result[f"{prefix}_{name}"] for name in names
                for when, result, prefix in (("before", before, "before"), ("after", after, "eval"))}
    if args.method == "dpo":
        return {**held_out, "loss_type": args.loss_type, "eval_pairs": len(after["eval_margins"]),
                "pairs_per_second": metrics["train_pairs"] / seconds}
    phase_seconds = metrics["train_phase_seconds"]
    shares = phases.shares(phase_seconds)
    return {**held_out, "eval_prompts": len(after["eval_rewards"]), "seconds_per_step": seconds / steps,
            "completions_per_second": metrics["train_completions"] / seconds,
            "phase_seconds": phase_seconds, "phase_shares": shares, "generation_share": shares["sampling"],
            "generated_tokens_per_second": metrics["train_generated_tokens"] / max(1e-9, phase_seconds["sampling"])}


def plot(args, before: dict, after: dict, path: str) -> None:
    from tuning.runs.plots import plot_before_after

    if args.method == "dpo":
        plot_before_after(before["before_margins"], after["eval_margins"], path,
                          f"DPO on {len(after['eval_margins'])} held-out preference pairs",
                          "implicit reward margin beta*(log-ratio chosen - log-ratio rejected); right of 0 = preferred",
                          ("SFT model (the reference: every margin 0)",
                           f"aligned ({after['eval_accuracy']:.1%} of pairs ranked right)"))
    else:
        plot_before_after(before["before_rewards"], after["eval_rewards"], path,
                          f"{args.method.upper()}: reward of greedy answers to {len(after['eval_rewards'])} held-out "
                          "prompts", f"reward ({args.reward})", (f"SFT model (mean {before['before_mean_reward']:+.3f})",
                                                 f"aligned (mean {after['eval_mean_reward']:+.3f})"))


def report_lines(args, metrics: dict) -> list[str]:
    if args.method == "dpo":
        head = (f"\nHeld-out preference accuracy {metrics['eval_accuracy_before']:.1%} -> "
                f"{metrics['eval_accuracy_after']:.1%} ({LOSS_NAMES[metrics['loss_type']]} loss "
                f"{metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}, mean margin "
                f"{metrics['eval_mean_margin_after']:+.3f}) on {metrics['eval_pairs']} pairs")
        speed = f"{metrics['pairs_per_second']:.1f} pairs/s"
    else:
        head = (f"\nHeld-out mean reward {metrics['eval_mean_reward_before']:+.3f} -> "
                f"{metrics['eval_mean_reward_after']:+.3f} on {metrics['eval_prompts']} prompts ("
                f"{metrics['eval_truncated_after']:.0%} cut at --max-new-tokens); KL to the SFT model "
                + ("not measured (--beta 0)" if metrics["eval_kl_after"] is None else f"{metrics['eval_kl_after']:.3f}"))
        speed = f"{metrics['seconds_per_step']:.2f} s/step, {metrics['completions_per_second']:.1f} answers/s"
    merged = f"; the merged full weights in {args.output_dir}/merged/" if args.merge else ""
    lines = [head, f"{speed} on {metrics['device']}; aligned model, metrics.json and before_after.png in "
                   f"{args.output_dir}/{merged}"]
    if args.method != "dpo":
        lines.append(phases.share_line(metrics["phase_seconds"], metrics["generated_tokens_per_second"]))
    return lines
