from pathlib import Path

import pytest

from cilkit.settings.plugins import import_plugin

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
    """Keep each test's state-0 cache and run directories inside its tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
