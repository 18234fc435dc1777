"""Plots bench/results.jsonl (from run.py) into bench/plot.png.

Two panels against the number of clients (log scale): delivered messages/s
and p99 latency, one colour per server. Closed-loop (W=8) scenarios form a
solid line, fixed-rate scenarios a dashed one, open-loop points are crosses;
zeros (nothing delivered) cannot show on the log scale and are left out.
For a denser closed-loop curve run run.py with --scenarios a,cl300,c,cl3000,cl10000.

    make bench                # runs run.py, then this script
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parent
STYLES = {"closed loop W=8": "o-", "fixed rate": "s--", "open loop": "x"}


def load_kind(r):
    return "closed loop W=8" if r["window"] else "fixed rate" if r["rate"] else "open loop"


def main():
    records = [json.loads(line) for line in open(BENCH / "results.jsonl")]
    runs = [r for r in records if r.get("kind") != "ratio" and r["senders"] > 0]
    servers = sorted({r["server"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("delivered_per_s", axes[0], "delivered msgs/s"), ("p99_ms", axes[1], "p99 latency (ms)"))
    for metric, ax, label in panels:
        for colour, server in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], servers):
            for kind, style in STYLES.items():
                points = sorted((r["clients"], r[metric]) for r in runs
                                if r["server"] == server and load_kind(r) == kind and r[metric] > 0)
                if points:
                    ax.plot(*zip(*points), style, color=colour, label=f"{server}, {kind}")
        ax.set(xscale="log", yscale="log", xlabel="clients", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("gevent chat benchmark (server on CPU 0, load generator on CPU 1)")
    fig.tight_layout()
    fig.savefig(BENCH / "plot.png", dpi=100)


if __name__ == "__main__":
    main()
