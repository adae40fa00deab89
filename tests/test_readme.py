"""README.md's two fresh-machine commands: CI runs the test command verbatim, and the main-job
command is the embedded quickstart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command_verbatim():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command.startswith("pip install torch==2.13.0 && ")  # torch first: no CUDA wheels
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert "python -m mypy && python -m pytest" in test_command  # the type check gates the suite


def test_readme_main_job_installs_torch_first_and_runs_the_quickstart():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert "pip install torch==2.13.0 && pip install -e . && cilkit run" in blocks
