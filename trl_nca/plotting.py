"""Plots of a run's log history, shared by `trl-nca plot` (`trl_nca.scripts.plot`) and the demo.

Offline runs: the policy log-likelihood of the best and worst response (the paper's likelihood trend) and the reward
accuracy. Online runs: the mean reward of the sampled completions, the share of groups without signal, and the
completions' mean length. Needs matplotlib (`pip install 'trl-nca[plot]'`).
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("Plotting needs matplotlib: pip install 'trl-nca[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_log_history(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Two panels over the training steps. Offline runs: policy log-likelihood of the best and worst response, and
    reward accuracy. Online runs (which log `reward`): the mean reward of the sampled completions, and the share of
    groups without signal with the completions' mean length."""
    train = [entry for entry in history if "loss" in entry and "step" in entry]
    if not train:
        raise ValueError("The log history has no training steps to plot")
    if "reward" in train[0] and "logps/best" not in train[0]:
        return _plot_online(train, path, title)
    plt = _pyplot()
    evals = [entry for entry in history if "eval_loss" in entry and "step" in entry]
    steps = [entry["step"] for entry in train]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, color in [("logps/best", "tab:green"), ("logps/worst", "tab:red")]:
        # Training batches change every step; evaluations on fixed rows, when the run has them, show the trend
        faint = {"alpha": 0.35, "linestyle": ":"} if evals else {}
        left.plot(
            steps,
            [entry.get(key, float("nan")) for entry in train],
            label=f"{key} (train batch)",
            color=color,
            marker=".",
            **faint,
        )
        if evals:
            left.plot(
                [e["step"] for e in evals],
                [e.get(f"eval_{key}", float("nan")) for e in evals],
                label=f"{key} (eval rows)",
                color=color,
                marker="o",
                linewidth=2,
            )
    left.set_xlabel("step")
    left.set_ylabel("log-likelihood (sum over response tokens)")
    left.set_title("likelihood of the best and worst response")
    left.legend(fontsize=7)
    right.plot(
        steps,
        [entry.get("rewards/accuracies", float("nan")) for entry in train],
        color="tab:blue",
        marker=".",
        label="train batch",
        **({"alpha": 0.35, "linestyle": ":"} if evals else {}),
    )
    if evals:
        right.plot(
            [e["step"] for e in evals],
            [e.get("eval_rewards/accuracies", float("nan")) for e in evals],
            color="tab:blue",
            marker="o",
            linewidth=2,
            label="eval rows",
        )
        right.legend()
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("step")
    right.set_ylabel("rewards/accuracies")
    right.set_title("reward accuracy (best response ranked first)")
    return _save(plt, fig, path, title)


def _plot_online(train: list[dict], path: str | Path, title: str) -> Path:
    plt = _pyplot()
    steps = [entry["step"] for entry in train]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(steps, [entry["reward"] for entry in train], color="tab:green", marker=".")
    left.set_xlabel("step")
    left.set_ylabel("mean reward of the sampled completions")
    left.set_title("reward of the policy's own samples")
    right.plot(steps, [entry.get("frac_tied_groups", float("nan")) for entry in train], color="tab:red", marker=".")
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("step")
    right.set_ylabel("groups whose rewards all tie", color="tab:red")
    lengths = right.twinx()
    lengths.plot(steps, [entry.get("completions/mean_length", float("nan")) for entry in train], color="tab:blue")
    lengths.set_ylabel("mean completion length (tokens)", color="tab:blue")
    right.set_title("groups without signal, completion length")
    return _save(plt, fig, path, title)
