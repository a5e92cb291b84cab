"""The client library stands alone: importing it loads neither torch, numpy nor the
service, and its distribution asks for httpx and pydantic only."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata


def test_importing_the_client_loads_no_torch_numpy_or_service() -> None:
    code = (
        "import sys, fastadapt_client; "
        "print(sorted(m for m in ('torch', 'numpy', 'service', 'models') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_distribution_depends_on_httpx_and_pydantic_only() -> None:
    requires = metadata.requires("fastadapt-client") or []
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requires}
    assert names == {"httpx", "pydantic"}
