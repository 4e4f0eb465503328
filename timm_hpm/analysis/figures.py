"""The sensitivity figure: accuracy vs eps, and the per-sample flip distances and margin-gradient norms of the FC
and static l2 heads (from :func:`timm_hpm.analysis.sensitivity.feature_sensitivity`)."""
import math

from .sensitivity import finite_median

__all__ = ['plot_sensitivity', 'require_matplotlib']

_LABELS = {'fc': 'FC head (linear)', 'static': 'l2 head (static prototypes)'}


def require_matplotlib(what: str) -> None:
    """Raise an ImportError that says ``what`` needs matplotlib and how to install it, when matplotlib (with its
    non-interactive Agg backend) cannot be imported. A command whose output includes a figure calls this before any
    work, so that a missing plotting library stops it at once, not after hours of work."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot  # noqa: F401
    except ImportError as error:
        raise ImportError(f'{what} needs matplotlib, which cannot be imported here ({error}); install it with '
                          '`pip install matplotlib` (or the package\'s dev extra, `pip install -e .[dev]`)') from None


def plot_sensitivity(result: dict, path, title: str = '') -> None:
    """Three panels: accuracy vs eps; feature-space flip distances; margin-gradient norms (PNG)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    curve = result['robust_accuracy']
    for h, accs in curve['accuracy'].items():
        axes[0].plot(curve['eps'], [100 * a for a in accs], marker='o', label=_LABELS.get(h, h))
    axes[0].set_xlabel(f"eps ({curve['norm']})")
    axes[0].set_ylabel('accuracy under APGD-CE + APGD-DLR (%)')
    axes[0].set_title('(a) robust accuracy vs eps')
    for i, (key, xlabel, panel) in enumerate((
            ('flip_distance', 'feature-space l2 distance to flip the decision', '(b) flip distance'),
            ('feature_grad_norm', '||d margin / d features||_2', '(c) margin-gradient norm')), start=1):
        for h, rec in result['per_sample'].items():
            values = [v for v, ok in zip(rec[key], rec['correct']) if ok and math.isfinite(v)]
            if values:
                axes[i].hist(values, bins=40, alpha=0.55, label=f"{_LABELS.get(h, h)} "
                             f"(median {finite_median(values):.3g})")
        axes[i].set_xlabel(xlabel)
        axes[i].set_ylabel('clean-correct test images')
        axes[i].set_title(panel)
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
