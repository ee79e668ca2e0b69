"""The Python the benchmarks run the API, the ceiling and etl.py with: a venv of requirements.txt alone."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def runtime_python() -> str:
    """The Python of a venv holding requirements.txt alone, as the README installs it (made once, in OUT), which the
    API, the ceiling and etl.py are measured in. The dev venv holds more that they would import: structlog imports
    rich (which pip-audit and schemathesis bring) when it is there, 5 MB of RSS that users' servers do not have."""
    requirements = ROOT / "requirements.txt"
    digest = hashlib.blake2b(requirements.read_bytes() + sys.version.encode(), digest_size=6).hexdigest()
    venv = OUT / f"runtime-venv-{digest}"
    python, made = venv / "bin" / "python", venv / "made"
    if not made.exists():
        print(f"making {venv.name} (pip install -r requirements.txt) ...", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        for argv in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
        ):
            if subprocess.run(argv, check=False).returncode != 0:
                sys.exit(f"could not make {venv} for the API to run from: `{' '.join(argv[1:])}` failed (above)")
        made.touch()
    return str(python)
