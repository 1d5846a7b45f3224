"""lens_core is usable from a notebook: importing every module pulls in neither Prefect nor Dask."""

import pkgutil
import subprocess
import sys

import lens_core


def test_lens_core_imports_no_orchestrator():
    modules = [m.name for m in pkgutil.walk_packages(lens_core.__path__, "lens_core.") if ".toy.train" not in m.name]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'dask', 'distributed', 'prefect_dask'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(modules) > 15
    assert out.stdout.strip() == ""
