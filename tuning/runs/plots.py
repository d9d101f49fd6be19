"""The pictures a training run leaves in its output dir: train.py's loss curve, and reward.py's and
align.py's held-out quantity before and after. matplotlib renders to files only (the Agg backend), so runs need no display."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(log_history: list[dict], loss_before: float, path: str) -> None:
    """Train and eval loss against step, with the base model's eval loss at step 0."""
    plt = pyplot()
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(0, loss_before)] + [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and e["step"]]
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


def plot_before_after(before: list[float], after: list[float], path: str, title: str, xlabel: str,
                      labels: tuple[str, str], ylabel: str = "count") -> None:
    """Histograms of a held-out quantity before and after training (reward margins, rewards)."""
    plt = pyplot()
    values = list(before) + list(after)
    low, high = min(values + [-1.0]), max(values + [1.0])
    bins = [low + (high - low) * i / 40 for i in range(41)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.hist(before, bins=bins, alpha=0.6, color="tab:gray", label=labels[0])
    ax.hist(after, bins=bins, alpha=0.6, color="tab:green", label=labels[1])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
