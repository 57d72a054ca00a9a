"""A local Prefect server for the pipeline: loopback only, SQLite and UI files under a project folder.

    rlhf server [--host 127.0.0.1] [--port 4200] [--home .prefect]
    export PREFECT_API_URL=http://127.0.0.1:4200/api     # printed on start
    rlhf serve &                                          # then run deployments

Nothing goes to ~/.prefect or into site-packages: PREFECT_HOME (database, logs, results) and
PREFECT_UI_STATIC_DIRECTORY (the UI build Prefect copies on start) live under --home. Analytics
are off.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def api_url(host: str = "127.0.0.1", port: int = 4200) -> str:
    return f"http://{host}:{port}/api"


def server_env(home: str | Path | None = None, host: str = "127.0.0.1", port: int = 4200,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `prefect server start` keeping all its state under `home` (default ./.prefect)."""
    home = Path(home or ".prefect").resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if base is None else base)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_UI_STATIC_DIRECTORY": str(home / "ui"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": api_url(host, port),
        # A fresh SQLite database can take longer than the 20 s default to migrate where ephemeral mode is used.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": env.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
    })
    return env


def server_command(host: str = "127.0.0.1", port: int = 4200, ui: bool = True) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
            "--analytics-off", *([] if ui else ["--no-ui"])]


def start_server(host: str = "127.0.0.1", port: int = 4200, home: str | None = None, ui: bool = True) -> int:
    """Run `prefect server start` in the foreground; returns its exit code."""
    env = server_env(home, host, port)
    print(f"Prefect server on {host}:{port}, PREFECT_HOME={env['PREFECT_HOME']}", flush=True)
    print(f"In other shells:  export PREFECT_API_URL={api_url(host, port)}", flush=True)
    try:
        return subprocess.run(server_command(host, port, ui), env=env).returncode
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # python -m flows.server [PORT]
    sys.exit(start_server(port=int(sys.argv[1]) if len(sys.argv) > 1 else 4200))
