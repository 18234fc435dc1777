"""bench/soak.png from bench/soak.jsonl: what the soak sampled, over the run."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parent


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH / "soak.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines()]
    samples = [r for r in records if "t" in r]
    summary = next((r for r in records if r.get("kind") == "summary"), {})
    minutes = [s["t"] / 60 for s in samples]
    panels = [
        ("rss_mb", "worker RSS (MB)"),
        ("connections", "open connections"),
        ("extra_fds", "fds beyond\none per connection"),
        ("extra_greenlets", "greenlets beyond\none per connection"),
        ("redis_mb", "Redis used memory (MB)"),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.1 * len(panels)), sharex=True)
    for axis, (key, label) in zip(axes, panels):
        axis.plot(minutes, [s[key] for s in samples], linewidth=1)
        axis.set_ylabel(label, fontsize=8)
        axis.grid(alpha=0.3)
        if summary.get("warmup"):
            axis.axvline(summary["warmup"], color="grey", linestyle=":", linewidth=1)
    axes[-1].set_xlabel("minutes (dotted: end of the warm-up)")
    fig.suptitle(f"soak: {summary.get('minutes', '?')} minutes, {summary.get('said', '?')} lines said, "
                 f"{len(summary.get('failures', []))} failures", fontsize=10)
    fig.tight_layout()
    fig.savefig(BENCH / "soak.png", dpi=110)


if __name__ == "__main__":
    main()
