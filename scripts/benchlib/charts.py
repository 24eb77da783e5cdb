"""The charts of ``--png``: ratios kombu-streams / Kombu per workload (matplotlib, Agg)."""

from __future__ import annotations

import sys
import textwrap

from .report import LOWER_IS_BETTER, header_line


def load_pyplot():
    """matplotlib.pyplot on the Agg backend, or exit with a hint (checked before the run)."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("bench: --png needs matplotlib: pip install matplotlib "
                 "(or pip install 'kombu-streams[bench]')")
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def write_png(path: str, head: dict, rows: list[dict], targets: list[dict]) -> None:
    """Horizontal bars from 1 to each row's ratio (log scale); green where kombu-streams wins."""
    plt = load_pyplot()
    rows = [r for r in rows if r['ratio']]
    ratios = [r['ratio'] for r in rows]
    threshold = {k: t['threshold'] for t in targets for k in t['rows']}
    fig, ax = plt.subplots(figsize=(11, 0.38 * len(rows) + 1.6))
    y = list(range(len(rows)))
    better = [(r['ratio'] < 1) == (r['key'] in LOWER_IS_BETTER) for r in rows]
    ax.barh(y, [v - 1 for v in ratios], left=1,
            color=['tab:green' if b else 'tab:red' for b in better])
    for i, v in enumerate(ratios):
        ax.text(v * (1.03 if v >= 1 else 0.97), i, f'{v:.2f}', va='center', fontsize=8,
                ha='left' if v >= 1 else 'right')
    marks = [(threshold[r['key']], i) for i, r in enumerate(rows) if r['key'] in threshold]
    if marks:
        ax.plot(*zip(*marks), linestyle='none', marker='|', color='black', markersize=16,
                mew=2, label='issue target')
        ax.legend(loc='lower right', fontsize=8)
    ax.axvline(1.0, color='grey', linewidth=1)
    ax.set_xscale('log')
    values = ratios + [t for t, _ in marks]
    ax.set_xlim(min(values + [1]) / 1.4, max(values + [1]) * 1.4)
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16)
             if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_yticks(y, [r['title'] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel('ratio kombu-streams / Kombu redis (medians; log scale; '
                  'green: kombu-streams better)')
    ax.set_title(textwrap.fill(header_line(head), 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_network_png(path: str, runs: list[dict]) -> None:
    """Grouped bars: per workload, one bar per round trip (log scale)."""
    plt = load_pyplot()
    ratios = [{r['key']: r['ratio'] for r in run['rows']} for run in runs]
    keys = [r['key'] for r in runs[0]['rows'] if all(x.get(r['key']) for x in ratios)]
    titles = {r['key']: r['title'] for r in runs[0]['rows']}
    fig, ax = plt.subplots(figsize=(11, 0.16 * len(keys) * len(runs) + 1.6))
    height = 0.8 / len(runs)
    for j, (run, ratio) in enumerate(zip(runs, ratios)):
        ys = [i + j * height for i in range(len(keys))]
        ax.barh(ys, [ratio[k] - 1 for k in keys], left=1, height=height,
                label=f"PING {run['header']['ping_rtt_ms']:.2f} ms")
        for y, k in zip(ys, keys):
            ax.text(ratio[k] * 1.03, y, f'{ratio[k]:.1f}', va='center', fontsize=7)
    ax.axvline(1.0, color='grey', linewidth=1)
    ax.set_xscale('log')
    values = [x[k] for x in ratios for k in keys] + [1]
    ax.set_xlim(min(values) / 1.5, max(values) * 2.5)  # room for the labels and the legend
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(keys))],
                  [titles[k] for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc='lower right')
    ax.set_xlabel('ratio kombu-streams / Kombu redis (log scale; rates: higher is better; '
                  'latency, commands, memory: lower is better)')
    ax.set_title(textwrap.fill(header_line(runs[0]['header']), 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


