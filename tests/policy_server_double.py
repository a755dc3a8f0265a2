"""A policy server process for the evaluator's shared-server tests: `simpler_double.ScriptedChunkPolicy`
behind the real `policies.serve.PolicyServer`, no torch.

    python tests/policy_server_double.py --port P --pid-file F    # appends its pid to F, then serves
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from simpler_double import ScriptedChunkPolicy

from policies.serve import PolicyServer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid-file", required=True)
    a = p.parse_args()
    with open(Path(a.pid_file), "a") as f:
        f.write(f"{os.getpid()}\n")
    PolicyServer(ScriptedChunkPolicy(), "127.0.0.1", a.port).serve_forever()


if __name__ == "__main__":
    main()
