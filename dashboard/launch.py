"""Start the dashboard: `rlhf dashboard --run-dir runs/demo` or `python -m dashboard.launch --run-dir runs/demo`.

Streamlit runs headless, bound to loopback by default, with usage statistics off; it serves its own
static assets (and plotly.js with them), so nothing is fetched from a CDN and it works offline.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().with_name("app.py")
ROOT = APP.parents[1]


def command(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The streamlit command line."""
    run_dir = Path(run_dir).expanduser().resolve()  # the server runs from the repository root
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        f"--server.address={host}", f"--server.port={int(port)}",
        "--server.headless=true",
        "--browser.gatherUsageStats=false",
        f"--browser.serverAddress={host}", f"--browser.serverPort={int(port)}",
        "--server.fileWatcherType=none",   # the app does not change while it runs; the registry is polled instead
        "--server.runOnSave=false",
        "--global.developmentMode=false",
        "--client.toolbarMode=viewer",
        "--theme.base=light",
        "--", "--run-dir", str(run_dir),
    ]


def environment(run_dir: str | Path) -> dict[str, str]:
    env = dict(os.environ)
    env["RLHF_RUN_DIR"] = str(Path(run_dir).expanduser().resolve())
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    env.setdefault("DO_NOT_TRACK", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8501, log: str | Path | None = None) -> subprocess.Popen:
    """Start the server in the background (its own process group); stop it with `stop(proc)`."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(command(run_dir, host, port), env=environment(run_dir), cwd=str(ROOT), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(host: str, port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> bool:
    """True once /_stcore/health answers ok; False on timeout or if `proc` exits."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/_stcore/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate the server by its PID (and its process group, which it leads)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(timeout)


def run(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8501) -> int:
    """Serve in the foreground until Ctrl-C. The process becomes streamlit (exec), so its PID is the
    server's and killing it stops the dashboard."""
    print(f"RLHF dashboard on http://{host}:{port}  (run dir {run_dir}; Ctrl-C to stop)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {host} exposes the dashboard beyond this machine; it has no authentication", file=sys.stderr)
    cmd = command(run_dir, host, port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, environment(run_dir))
    return 0  # pragma: no cover - exec does not return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8501)
    a = p.parse_args(argv)
    return run(a.run_dir, a.host, a.port)


if __name__ == "__main__":
    sys.exit(main())
