"""The real app on a loopback port, for the browser tests and the browser benchmarks (no pytest here)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServerDidNotStart(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cache: Path, *, code_root: Path = ROOT, watcher: str | None = None,
                 timeout: float = 120, script: str = "app.py") -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` from `code_root` (another checkout to compare against, say) on a free
    loopback port with REDEX_CACHE=cache; returns (process, url) once it answers its health check.
    `watcher`: Streamlit's fileWatcherType, if not the one `.streamlit/config.toml` sets; `script`: another
    script to serve (e.g. a benchmark's baseline), relative to `code_root`."""
    port = free_port()
    env = dict(os.environ, REDEX_CACHE=str(cache), PYTHONPATH=str(code_root))
    flags = ["--server.fileWatcherType", watcher] if watcher else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", script, "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         *flags], cwd=code_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise ServerDidNotStart(f"streamlit ({code_root}) did not start (exit code {proc.poll()})") from None
            time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=20)
