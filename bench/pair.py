"""Two checkouts of ours side by side, at the same time, on the same core: deliveries per
server CPU-second, the one against the other.

run.py --compare runs the two servers one after the other, so a round of each sees a
different machine: on a shared VM single rounds of one commit differ by 20-40 %, and five
rounds cannot tell a 3 % difference. Here both servers are pinned to CPU 0 at once, each with
its own load generator on CPU 1 running the same scenario, so they share whatever else the
machine does; the kernel gives each about half the core, and what each delivers per
CPU-second of its own is compared. Two copies of one commit agree to within 1 %.

It holds only while the servers are the bottleneck: when the two load generators together
need most of CPU 1 (c2 and d do), or one server gets much less CPU than the other, the ratio
measures the generators, and the round says so.

    git worktree add /tmp/before e16cecb
    .venv/bin/python bench/pair.py /tmp/before --scenarios a,r100 --rounds 4
    .venv/bin/python bench/pair.py /tmp/before --server ours-redis --scenarios r100   # workers' CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

import run

# A round is suspect when the load generators together used more of CPU 1 than this (percent),
# or one server's CPU time differs from the other's by more than this share.
GENERATORS_BUSY = 90.0
CPU_SPLIT = 0.1


def one_round(repos: list[Path], server_name: str, scenario: str, duration: int) -> dict[Path, dict[str, float]]:
    """Both servers under the scenario at once: per repo, deliveries/s, per CPU-second, the
    server's CPU-seconds over the send phase and its generator's CPU %."""
    flags = run.SCENARIOS[scenario][1]
    servers = {repo: run.Server(server_name, run.free_port(), repo) for repo in repos}
    try:
        generators = {}
        for repo, server in servers.items():
            command = ["taskset", "-c", "1", str(run.LOADGEN), "-json", f"-duration={duration}s",
                       f"-url=ws://127.0.0.1:{server.port}/ws", f"-origin=http://127.0.0.1:{server.port}",
                       *run.loadgen_flags(flags, server_name)]
            generators[repo] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cpu = {}
        for mark in ("# sending", "# sent"):  # (the generators bracket their send phase with these)
            for generator in generators.values():
                assert generator.stderr is not None
                for line in generator.stderr:
                    if line.strip() == mark:
                        break
            cpu[mark] = {repo: server.cpu() for repo, server in servers.items()}
        results = {}
        for repo, generator in generators.items():
            out, _ = generator.communicate()
            record = json.loads(out)
            seconds = cpu["# sent"][repo] - cpu["# sending"][repo]
            results[repo] = {"per_s": record["delivered_per_s"], "per_cpu_s": record["delivered"] / seconds,
                             "cpu_s": seconds, "generator_pct": record["loadgen_cpu_pct"]}
        return results
    finally:
        for server in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="the checkout to compare against")
    parser.add_argument("--repo", type=Path, default=run.REPO, help="the checkout measured (default: this one)")
    parser.add_argument("--server", default="ours")
    parser.add_argument("--scenarios", default="a,r100")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    baseline, repo = args.baseline.resolve(), args.repo.resolve()
    for scenario in args.scenarios.split(","):
        ratios = []
        for number in range(1, args.rounds + 1):
            order = [baseline, repo] if number % 2 else [repo, baseline]  # (who starts first alternates)
            result = one_round(order, args.server, scenario, args.duration)
            ratio = result[repo]["per_cpu_s"] / result[baseline]["per_cpu_s"]
            ratios.append(ratio)
            busy = sum(r["generator_pct"] for r in result.values())
            cpus = [r["cpu_s"] for r in result.values()]
            suspect = busy > GENERATORS_BUSY or abs(cpus[0] - cpus[1]) > CPU_SPLIT * max(cpus)
            print(f"{scenario} round {number}: " + "  ".join(
                f"{path.name} {r['per_s']:,.0f}/s {r['per_cpu_s']:,.0f}/cpu-s ({r['cpu_s']:.2f} cpu-s)"
                for path, r in result.items()) + f"  generators {busy:.0f}% of CPU 1  ratio {ratio:.3f}"
                + ("  (suspect: the generators or an uneven split, not the servers)" if suspect else ""),
                flush=True)
        print(f"{scenario}: {repo.name} / {baseline.name} deliveries per server CPU-second, median "
              f"{statistics.median(ratios):.3f} (rounds {' '.join(f'{r:.3f}' for r in ratios)})", flush=True)


if __name__ == "__main__":
    main()
