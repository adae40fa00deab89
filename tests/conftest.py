import os
from pathlib import Path

import pytest

# The tests' idle OpenMP threads sleep (before cilkit is imported, which would choose: spinning
# when no other cilkit run holds the machine): the suite runs many processes side by side (its
# --jobs and CLI tests, pytest-xdist's workers), and a spinning thread would steal their cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cilkit.settings.plugins import import_plugin  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Methods written outside the package, each one file: the test-only ones (tests/methods/) and
# the examples that register a method. Registered here once, so that every test parametrised
# over the registry (cilkit.settings.registry.METHODS) covers a new one the day its file is added.
EXTRA_METHOD_FILES = sorted((ROOT / "tests" / "methods").glob("*.py")) + sorted(
    p for p in (ROOT / "examples").glob("*.py") if "register_method" in p.read_text())
for _path in EXTRA_METHOD_FILES:
    import_plugin(str(_path))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep each test's state-0 cache, run directories and machine markers (cilkit.common.omp)
    inside its tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CILKIT_MACHINE_DIR", str(tmp_path / "machine"))
    monkeypatch.chdir(tmp_path)
