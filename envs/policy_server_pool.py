"""One policy server process shared by the evaluator's simulator workers (instead of one model per worker).

`--workers N` with a checkpoint starts `python -m policies.serve --checkpoint DIR --port P` once; every
worker builds a `policies.client.RemotePolicy` to it (the server batches concurrent requests). A policy
spec {"kind": "serve", "command": [...], "client_kwargs": {...}} launches any server command the same way
("{port}" in the command is replaced by a free port). The server dies with the evaluator: it is ended on
close, and on Linux the kernel ends it when the evaluator itself is killed (kill -9 included). No torch here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# SelfFlowPolicy.from_pretrained options and where they belong when the policy is served.
SERVER_SIDE = {"device"}  # python -m policies.serve --device
CLIENT_SIDE = {"execute_steps", "ensemble", "ensemble_coeff", "sticky_gripper", "gripper_deadzone", "seed", "timeout"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def shared_server_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint policy spec -> the spec of one `policies.serve` process its workers share ("serve" kind).

    Options the server's command line does not take (e.g. sampling_steps) raise ValueError naming the fix.
    """
    kwargs = dict(spec.get("kwargs", {}))
    unknown = sorted(set(kwargs) - SERVER_SIDE - CLIENT_SIDE)
    if unknown:
        raise ValueError(f"policy options {unknown} cannot be passed to a shared policy server (python -m "
                         f"policies.serve takes --device only; the workers' clients take {sorted(CLIENT_SIDE)}); "
                         "drop them or run with workers=1")
    command = [sys.executable, "-m", "policies.serve", "--checkpoint", str(spec["path"]), "--host", "127.0.0.1",
               "--port", "{port}"]
    if kwargs.get("device"):
        command += ["--device", str(kwargs["device"])]
    client = {k: v for k, v in kwargs.items() if k in CLIENT_SIDE}
    return {"kind": "serve", "command": command, "client_kwargs": client, "name": spec.get("name", "ours")}


def _parent_death_signal():
    """A callable for Popen's preexec_fn that makes the child get SIGTERM when its parent dies (Linux), or None.

    libc is loaded here, in the parent: the child between fork and exec only calls it (no imports there)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return set_signal


class PolicyServerProcess:
    """A policy server child process; `start()` returns once it answers GET /healthz.

    command: argv with "{port}" where the port goes. log_path: where its stdout/stderr go (None: discarded).
    threads: OMP/MKL threads for the server (None: inherit), set deliberately beside simulator workers.
    """

    def __init__(self, command: list[str], host: str = "127.0.0.1", port: int | None = None,
                 log_path: str | Path | None = None, startup_timeout_s: float = 600.0, threads: int | None = None):
        self.host, self.port = host, port or free_port(host)
        self.command = [str(c).replace("{port}", str(self.port)) for c in command]
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s, self.threads = float(startup_timeout_s), threads
        self.proc: subprocess.Popen | None = None

    def start(self) -> PolicyServerProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        out = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it; closed below
        try:
            self.proc = subprocess.Popen(self.command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_parent_death_signal())
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self._wait_until_up()
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.host}:{self.port}/healthz"
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"policy server exited with code {code} before answering ({' '.join(self.command)})"
                                   f"{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our own loopback server
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"policy server did not answer {url} within {self.startup_timeout_s:.0f} s"
                                   f"{self._log_tail()}")
            time.sleep(0.2)

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "; its log ends with:\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])

    def client_spec(self, client_kwargs: dict[str, Any] | None = None, name: str = "ours") -> dict[str, Any]:
        """The policy spec workers use to reach this server (RemotePolicy)."""
        return {"kind": "server", "host": self.host, "port": self.port, "kwargs": dict(client_kwargs or {}),
                "name": name}

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> PolicyServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
