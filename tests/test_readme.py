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


def _table_rows(text, heading):
    """``{first cell: whole line}`` of the first table under ``heading`` (a markdown heading line)."""
    lines = text.split(heading + "\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_every_config_key_and_method_option_is_in_the_readme_tables():
    """The README's tables are the reference of the keys (``cilkit info NAME`` adds each option's
    type, default and meaning): every key keys.py declares and every option of a built-in method
    is named there, each part of a dotted key in its section's row (``data.synthetic.size``:
    `synthetic` and `size` in the `data` row)."""
    from cilkit.keys import KEYS
    from cilkit.registry import METHODS

    text = (ROOT / "README.md").read_text()
    config, methods = _table_rows(text, "### The config"), _table_rows(text, "## Methods")
    missing = []
    for key in KEYS:
        section, *rest = key.split(".")
        row = config.get(section if rest else "top level")
        if row is None or any(f"`{part}`" not in row[1] for part in (rest or [section])):
            missing.append(key)
    for name, cls in METHODS.items():
        if not cls.__module__.startswith("cilkit."):
            continue  # a plugin's, registered by another test
        row = methods.get(name)
        missing += [f"{name}.{opt}" for opt in cls.Config.model_fields if row is None or f"`{opt}`" not in row[2]]
    assert not missing, f"not in README.md's tables: {missing}"
