"""kvmcoal bench --plot: ns/entry per consumer and batch size, and guest stores/s.

Needs matplotlib (pip install 'kvmcoal[plot]').
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .reporting import Report, check_output_path

# The consumer section's methods that are kvmcoal's own (the rest are baselines).
KVMCOAL_CONSUMERS = frozenset({"drain_into_numpy", "drain_into_bytearray", "drain", "consume",
                               "pop_loop", "iteration"})


def _pyplot() -> ModuleType:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f"--plot needs matplotlib (pip install 'kvmcoal[plot]'): {exc}") \
            from None
    return plt


def check_plot_path(path: str | Path, sections: Sequence[str]) -> None:
    """Raise RuntimeError now, before measuring, if plot() could not write *path*."""
    from kvmcoal import kvm
    if "consumer" not in sections and ("kvm" not in sections
                                       or kvm.why_unavailable() is not None):
        raise RuntimeError("nothing to plot: --plot needs the consumer section, or the kvm "
                           "section on a machine where /dev/kvm works")
    plt = _pyplot()
    suffix = Path(path).suffix.lstrip(".").lower()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if suffix not in formats:
        kind = repr(suffix) if suffix else "a file without an extension"
        raise RuntimeError(f"--plot {path}: matplotlib cannot write {kind}; use one of "
                           + ", ".join(f".{f}" for f in sorted(formats)))
    check_output_path(path, "--plot")


def _batches_panel(ax: Any, plt: ModuleType, batches: list[dict[str, Any]]) -> None:
    by_method: dict[str, list[tuple[int, float]]] = {}
    method_labels: dict[str, str] = {}
    for b in batches:
        by_method.setdefault(b["method"], []).append((b["entries"], b["best_ns_per_entry"]))
        method_labels[b["method"]] = b["label"]
    tab20 = plt.get_cmap("tab20")
    for i, (key, points) in enumerate(by_method.items()):
        points.sort()
        # kvmcoal's own methods solid, the baselines dashed.
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                color=tab20(i % 20), linestyle="-" if key in KVMCOAL_CONSUMERS else "--",
                label=method_labels[key])
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted({b["entries"] for b in batches})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("entries per call (batch size)")
    ax.set_ylabel("ns per entry (best)")
    ax.set_title("Consumer cost per entry (solid: kvmcoal, dashed: baselines)")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, which="both", alpha=0.3)


def _kvm_panel(ax: Any, kvm_methods: dict[str, dict[str, Any]]) -> None:
    runs = [m["label"] for m in kvm_methods.values()]
    rates = [m["median_stores_per_s"] for m in kvm_methods.values()]
    ax.barh(runs, rates, color=["tab:green" if "uncoalesced" not in run else "tab:red"
                                for run in runs])
    ax.set_xlabel("guest stores per second (median)")
    ax.set_title("Real KVM: coalesced (green) vs not (red)")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize="small")


def plot(report: Report, path: str | Path) -> None:
    """Draw ns/entry per consumer method and batch size, and guest stores/s, into *path*."""
    plt = _pyplot()
    sections = report["sections"]
    batches = sections.get("consumer", {}).get("batches")
    kvm_methods = {key: m for key, m in sections.get("kvm", {}).get("methods", {}).items()
                   if m.get("median_stores_per_s") is not None}
    panels = [p for p, has in (("batches", batches), ("kvm", kvm_methods)) if has]
    if not panels:
        raise RuntimeError("nothing to plot: run the consumer or kvm section")
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 5.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "batches":
            _batches_panel(ax, plt, batches)
        else:
            _kvm_panel(ax, kvm_methods)
    meta = report["meta"]
    fig.suptitle(f"kvmcoal {meta['kvmcoal']}, Python {meta['python']}, {meta['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
