"""Run the Autobahn|Testsuite fuzzing client against the chat echo WebSocket server.

Usage (from anywhere; paths are resolved against the repository root):

    python tests/conformance/run.py [--server-cmd CMD] [--report-dir DIR] [--timeout S]

wstest only runs on Python 2.7, so it lives in its own virtualenv, ``.venv27``
at the repository root, built from ``requirements-py27.txt`` on first use (and
rebuilt when that file changes). Without a Python 2.7 interpreter the run is
skipped with exit status 0.

The echo server (default ``python -m tests.conformance.echo_server``; ``--port
PORT`` is always appended) is started with ``CHAT_MAX_MESSAGE_SIZE`` = 16 MiB so
the section 9 cases fit, and is stopped by PID at the end. The spec comes from
``fuzzingclient.json``; the report is written to a temp dir unless
``--report-dir`` is given.

Exit status: 0 all cases pass, 1 some case is FAILED / NON-STRICT / closed
uncleanly, 2 the harness itself failed (venv, server, wstest, missing report).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV = REPO / ".venv27"
REQUIREMENTS = HERE / "requirements-py27.txt"
SPEC_TEMPLATE = HERE / "fuzzingclient.json"
VIRTUALENV_PIN = "virtualenv==20.15.1"
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
CLEAN_CLOSES = ("OK", "INFORMATIONAL")


class HarnessError(Exception):
    """The harness could not produce a report (as opposed to cases failing)."""


def py2_env() -> dict[str, str]:
    """The environment for Python 2.7 processes, without Python 3 path settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONWARNINGS"] = "ignore"  # cryptography's Python 2 deprecation banner
    return env


def find_python27() -> str | None:
    """Return a working Python 2.7 interpreter (pyenv installs first), or None."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [str(p) for p in sorted(pyenv.glob("versions/2.7*/bin/python"), reverse=True)]
    candidates += [p for p in (shutil.which("python2.7"), shutil.which("python2")) if p]
    for exe in candidates:  # pyenv shims exist even when they cannot run, so try each one
        probe = subprocess.run([exe, "-c", "import sys; assert sys.version_info[:2] == (2, 7)"],
                               env=py2_env(), capture_output=True)
        if probe.returncode == 0:
            return exe
    return None


def run_checked(cmd: list[str]) -> None:
    """Run a setup command, echoing it; raise HarnessError with its output if it fails."""
    print("+", shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, env=py2_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise HarnessError(f"command failed: {shlex.join(cmd)}\n{done.stdout[-4000:]}")


def ensure_venv(python27: str) -> Path:
    """Create or refresh .venv27 from the pinned requirements; return the wstest path."""
    wstest = VENV / "bin" / "wstest"
    stamp = VENV / REQUIREMENTS.name
    wanted = REQUIREMENTS.read_text()
    if wstest.exists() and stamp.exists() and stamp.read_text() == wanted:
        return wstest
    print(f"Setting up {VENV} for wstest with {python27}", flush=True)
    if subprocess.run([python27, "-m", "virtualenv", "--version"], env=py2_env(),
                      capture_output=True).returncode != 0:
        run_checked([python27, "-m", "pip", "install", VIRTUALENV_PIN])
    if not (VENV / "bin" / "python").exists():
        run_checked([python27, "-m", "virtualenv", str(VENV)])
    run_checked([str(VENV / "bin" / "python"), "-m", "pip", "install", "-r", str(REQUIREMENTS)])
    run_checked([str(wstest), "--help"])
    stamp.write_text(wanted)
    return wstest


def free_port() -> int:
    """Ask the kernel for an unused loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, server: subprocess.Popen[bytes], deadline_s: float) -> None:
    """Poll until the server accepts connections, it exits, or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise HarnessError(f"echo server exited early with status {server.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)  # poll interval only; readiness is the successful connect
    raise HarnessError(f"echo server did not listen on port {port} within {deadline_s:.0f}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate one process we started, by its PID, killing it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_wstest(wstest: Path, port: int, outdir: Path, timeout_s: float) -> None:
    """Write the spec and run the fuzzing client against ws://127.0.0.1:port/."""
    spec = json.loads(SPEC_TEMPLATE.read_text())
    spec["outdir"] = str(outdir)
    spec["servers"] = [{"agent": "chat", "url": f"ws://127.0.0.1:{port}/"}]
    spec_path = outdir / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path = outdir / "wstest.log"
    print(f"Running wstest on cases {', '.join(spec['cases'])}", flush=True)
    with log_path.open("wb") as log:
        client = subprocess.Popen([str(wstest), "-m", "fuzzingclient", "-s", str(spec_path)],
                                  cwd=outdir, env=py2_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            status = client.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"wstest did not finish within {timeout_s:.0f}s") from None
        finally:
            stop(client)
    if status != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        raise HarnessError(f"wstest exited with status {status}:\n" + "\n".join(tail))


def case_key(case_id: str) -> tuple[int, ...]:
    """Sort key so that case 9.10.1 follows 9.2.1."""
    return tuple(int(part) for part in case_id.split("."))


def report(outdir: Path) -> int:
    """Print per-section counts and the problem cases; return the exit status."""
    index_path = outdir / "index.json"
    if not index_path.exists():
        raise HarnessError(f"no report at {index_path}")
    results: dict[str, dict[str, object]] = json.loads(index_path.read_text())["chat"]
    by_section: dict[str, Counter[str]] = {}
    problems = []
    for case_id in sorted(results, key=case_key):
        res = results[case_id]
        behavior, close = str(res["behavior"]), str(res["behaviorClose"])
        counts = by_section.setdefault(case_id.split(".")[0], Counter())
        counts[behavior] += 1
        counts["close " + (close if close in CLEAN_CLOSES else "other")] += 1
        if behavior in ("FAILED", "NON-STRICT") or close not in CLEAN_CLOSES:
            detail = json.loads((outdir / str(res["reportfile"])).read_text())
            problems.append(f"  {case_id:<9} {behavior:<13} close={close:<13} "
                            f"{detail.get('result', '')} {detail.get('resultClose', '')}".rstrip())
    columns = BEHAVIORS + ("close OK", "close INFORMATIONAL", "close other")
    total: Counter[str] = sum(by_section.values(), Counter())
    print("section " + " ".join(f"{c:>{max(len(c), 5)}}" for c in columns))
    for section, counts in [*by_section.items(), ("total", total)]:
        print(f"{section:<7} " + " ".join(f"{counts[c]:>{max(len(c), 5)}}" for c in columns))
    if problems:
        print(f"\n{len(problems)} case(s) FAILED, NON-STRICT or closed uncleanly:")
        print("\n".join(problems))
        return 1
    print(f"\nAll {len(results)} cases passed.")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-cmd", default=shlex.join([sys.executable, "-m", "tests.conformance.echo_server"]),
                        help="echo server command, run from the repo root; '--port PORT' is appended")
    parser.add_argument("--report-dir", type=Path, help="keep the wstest report here (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=900, help="wstest time limit in seconds")
    args = parser.parse_args()

    python27 = find_python27()
    if python27 is None:
        print("Python 2.7 not found: conformance skipped")
        return 0
    try:
        wstest = ensure_venv(python27)
        with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
            outdir = args.report_dir.resolve() if args.report_dir else Path(tmp)
            outdir.mkdir(parents=True, exist_ok=True)
            port = free_port()
            cmd = shlex.split(args.server_cmd) + ["--port", str(port)]
            print("Starting echo server:", shlex.join(cmd), flush=True)
            env = {**os.environ, "CHAT_MAX_MESSAGE_SIZE": str(MAX_MESSAGE_SIZE)}
            server = subprocess.Popen(cmd, cwd=REPO, env=env)
            started = time.monotonic()
            try:
                wait_for_port(port, server, deadline_s=30)
                run_wstest(wstest, port, outdir, args.timeout)
            finally:
                stop(server)
            print(f"wstest finished in {time.monotonic() - started:.0f}s")
            if args.report_dir:
                print(f"Report: {outdir / 'index.html'}")
            print()
            return report(outdir)
    except HarnessError as exc:
        print(f"conformance harness error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
