"""PNG plots for reports (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_factor_histograms(samples: dict, path: Path, title: str) -> None:
    """One panel per layer: histograms of the weight's and each factor's entries, each divided
    by its own rms, on a log count axis (flat factors have short tails)."""
    plt = _pyplot()
    n = len(samples)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, tensors) in zip(axes.flat, samples.items()):
        for label, t in tensors.items():
            x = t.float().flatten()
            x = x / x.pow(2).mean().sqrt().clamp(min=1e-30)
            ax.hist(x.numpy(), bins=121, histtype="step", log=True, label=label)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("entry / rms", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layer_errors(layers: dict, path: Path, title: str) -> None:
    """Relative error per layer (left) and the convergence history of every layer (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4))
    names = list(layers)
    errors = [layers[n]["rel_error"] or 0.0 for n in names]
    left.bar(range(len(names)), errors, width=1.0)
    left.set_xlabel("layer (model order)")
    left.set_ylabel("relative weight error")
    for name in names:
        hist = layers[name]["history"]
        if hist:
            right.plot(range(len(hist)), hist, linewidth=0.6, alpha=0.6)
    right.set_xlabel("greedy init, sweeps..., float16 coefficients")
    right.set_ylabel("relative error")
    right.set_title("convergence of every layer", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
