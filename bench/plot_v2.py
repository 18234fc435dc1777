"""Plots ours against the Socket.IO peer in the rooms scenarios (bench/results-v2.jsonl) into
bench/plot-v2.png.

Four panels, one per goal of the comparison: deliveries/s in one room of 1,000 (c2) and in
100 rooms of 10 (r100), closed loop; p50 and p99 at 100 lines/s into one room of 1,000 (b2);
memory per idle connection (e2). A bar is the median of the runs (run.py --rounds), the
whiskers their range; each panel's title gives ours over the peer and the goal.

    .venv/bin/python bench/run.py --servers ours,socketio --scenarios c2,r100,b2,e2 \\
        --rounds 3 --wait-idle 60 --out bench/results-v2.jsonl
    .venv/bin/python bench/plot_v2.py
"""
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parent
SERVERS = ("ours", "socketio")
PANELS = [  # (scenario, metrics, axis label, title, goal for ours / peer, log scale)
    ("c2", ["delivered_per_s"], "deliveries/s", "1,000 clients in one room, closed loop", "goal ≥ 10×", True),
    ("r100", ["delivered_per_s"], "deliveries/s", "100 rooms of 10 clients, closed loop", "goal ≥ 10×", True),
    ("b2", ["p50_ms", "p99_ms"], "latency (ms)", "1,000 clients in one room, 100 lines/s", "goal p99 ≤ 0.1×", True),
    ("e2", ["rss_per_conn_kb"], "KB per connection", "5,000 idle clients in one room", "goal ≤ 0.5×", False),
]


def main():
    records = [json.loads(line) for line in open(BENCH / "results-v2.jsonl")]
    runs = [r for r in records if r.get("kind") is None and r["server"] in SERVERS]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 4.8))
    for ax, (scenario, metrics, label, title, goal, log) in zip(axes, PANELS):
        medians = {}
        for m, metric in enumerate(metrics):
            for s, server in enumerate(SERVERS):
                values = [r[metric] for r in runs if (r["scenario"], r["server"]) == (scenario, server)]
                if not values:
                    continue
                mid = statistics.median(values)
                medians[server, metric] = mid
                x = m * (len(SERVERS) + 1) + s
                ax.bar(x, mid, color=colours[s], label=server if m == 0 else None,
                       yerr=[[mid - min(values)], [max(values) - mid]], capsize=4)
                ax.annotate(f"{mid:,.0f}" if mid >= 100 else f"{mid:.1f}", (x, mid), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks([m * (len(SERVERS) + 1) + (len(SERVERS) - 1) / 2 for m in range(len(metrics))],
                      [metric.removesuffix("_ms").removesuffix("_per_s") for metric in metrics])
        if len(metrics) == 1:
            ax.set_xticks([])
        ratio = medians.get(("ours", metrics[-1])), medians.get(("socketio", metrics[-1]))
        ratio_text = f"ours/peer {ratio[0] / ratio[1]:.3g}×" if all(ratio) else "ours/peer –"
        ax.set_title(f"{scenario}: {title}\n{ratio_text} ({goal})", fontsize=9)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("ours (v2) against python-socketio 5.18.1 under gunicorn + gevent-websocket"
                 " (server on CPU 0, load generator on CPU 1)")
    fig.tight_layout()
    fig.savefig(BENCH / "plot-v2.png", dpi=100)


if __name__ == "__main__":
    main()
