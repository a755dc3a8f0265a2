"""`pip install ./client`: the torch-free policy client as its own package (protocol, client, RemotePolicy)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_client_wheel_holds_the_client_and_imports_without_torch(tmp_path):
    src = tmp_path / "src"  # a copy of the two folders the build reads, so the checkout stays clean
    shutil.copytree(REPO / "client", src / "client", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    shutil.copytree(REPO / "policies", src / "policies", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src / "client")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("selfflow_worldmodel_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {"policies/__init__.py", "policies/protocol.py", "policies/client.py"} <= names
    meta = next(n for n in names if n.endswith("METADATA"))
    lines = (tmp_path / "site" / meta).read_text().splitlines()
    requires = [line for line in lines if line.startswith("Requires-Dist")]
    assert not any("torch" in r for r in requires), requires
    # Import from the wheel alone, with torch made unimportable (as in SimplerEnv's environment).
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, policies\n"
            "from policies import PolicyClient, RemotePolicy, packb, unpackb\n"
            "assert policies.__file__.startswith(sys.argv[1]), policies.__file__\n"
            "assert unpackb(packb({'a': np.arange(3)}))['a'].tolist() == [0, 1, 2]\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
