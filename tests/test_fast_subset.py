"""The fast tests (``pytest -m "not slow"``, README) still cover every test file and every module
of the package: a file whose tests are all marked slow, or a module of src/cilkit that no fast
test reaches, fails here.

A module is reached when a test file with fast tests imports it (or a name defined in it,
through a package's re-export), or when :data:`EXERCISED_BY` names the fast test that runs it
(modules only a run or the command line reaches)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "cilkit"
TEST_FILES = sorted((ROOT / "tests").glob("test_*.py"))

# module -> the fast test that exercises it, for the modules no test file imports by name
EXERCISED_BY = {
    "cilkit.__main__": "test_config.py::test_console_script_exit_status",
    "cilkit.common.machine": "test_cli.py::test_the_first_line_of_a_run_states_its_setup",  # the model-size check
    "cilkit.data.checks": "test_data_checks.py::test_list_label_99_in_a_3_class_list_names_the_line",
    "cilkit.data.cifar": "test_data.py::test_cifar100_pixel_layout_and_labels",
    "cilkit.data.folders": "test_data_checks.py::test_imagefolder_class_missing_from_val",
    "cilkit.methods.active.method": "test_active.py::test_active_run_trains_only_on_annotated_images_and_resumes",
    "cilkit.methods.il2m": "test_calibration.py::test_live_il2m_equals_calibrated_finetune",
    "cilkit.methods.joint": "test_hooks.py::test_train_set_and_memory_candidates_are_pure_queries",  # every method
    "cilkit.methods.scail": "test_hooks.py::test_train_set_and_memory_candidates_are_pure_queries",
    "cilkit.models.size": "test_strict_inputs.py::test_the_model_size_is_estimated_without_allocating_it",
    "cilkit.models.small": "test_cli.py::test_the_first_line_of_a_run_states_its_setup",  # the convnet
    "cilkit.models.split": "test_lucir.py::test_cosine_head_shares_one_sigma_and_freezes_the_old_rows",
    "cilkit.training.divergence": "test_divergence.py::test_a_nan_loss_stops_a_single_run_in_its_first_epoch_with_one_line",
    "cilkit.run.history": "test_logs.py::test_a_cached_state0_has_a_state_line_and_no_epoch_lines",
    "cilkit.run.provenance": "test_cli.py::test_the_first_line_of_a_run_states_its_setup",  # every run records it
    "cilkit.run.store": "test_cli.py::test_the_first_line_of_a_run_states_its_setup",
    "cilkit.run.tensorboard": "test_logs.py::test_tensorboard_switched_on_at_resume_holds_the_earlier_states",
    "cilkit.training.class_statistics": "test_calibration.py::test_statistics_are_the_class_means_of_the_state_model",
    "cilkit.cil.shots": "test_shot_groups.py::test_six_classes_by_hand",
    "cilkit.analysis.paired": "test_shot_groups.py::test_compare_metric_pairs_a_shot_figure",
}


def _is_slow_mark(node: ast.expr) -> bool:
    """``pytest.mark.slow`` (or a list holding it)."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(_is_slow_mark(e) for e in node.elts)
    return isinstance(node, ast.Attribute) and node.attr == "slow"


def fast_tests(path: Path) -> list[str]:
    """The test functions of ``path`` not marked slow (by a module-level ``pytestmark`` or a
    decorator; a parametrised test counts when the function itself is not marked)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                for t in node.targets) and _is_slow_mark(node.value):
            return []
    return [node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")
            and not any(_is_slow_mark(d) for d in node.decorator_list)]


def modules() -> set[str]:
    names = set()
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_by(path: Path) -> set[str]:
    """The cilkit modules ``path`` imports, and those defining the names it imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cilkit"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cilkit"):
            assert node.module is not None
            found.add(node.module)
            package = importlib.import_module(node.module)
            for alias in node.names:
                obj = getattr(package, alias.name, None)
                found.add(obj.__name__ if isinstance(obj, ModuleType) else getattr(obj, "__module__", "") or "")
                found.add(f"{node.module}.{alias.name}")
    return found


def test_every_test_file_keeps_a_fast_test():
    assert TEST_FILES
    without = [p.name for p in TEST_FILES if not fast_tests(p)]
    assert not without, f"every test of these files is marked slow: keep one fast (pytest -m 'not slow'): {without}"


def test_every_module_is_reached_by_a_fast_test():
    reached: set[str] = set()
    for path in TEST_FILES:
        if fast_tests(path):
            reached |= imported_by(path)
    for module, test in EXERCISED_BY.items():
        file, name = test.split("::")
        assert name in fast_tests(ROOT / "tests" / file), f"{module}: {test} is not a fast test (any more)"
        reached.add(module)
    missed = sorted(m for m in modules() if m not in reached and not any(r.startswith(m + ".") for r in reached))
    assert not missed, ("no fast test reaches these modules: import them in a fast test, or name the fast test that "
                        f"runs them in EXERCISED_BY: {missed}")


def test_the_check_sees_slow_marks(tmp_path):
    path = tmp_path / "test_x.py"
    path.write_text("import pytest\n\n@pytest.mark.slow\ndef test_a():\n    pass\n\n\n"
                    "@pytest.mark.parametrize('x', [1])\ndef test_b(x):\n    pass\n")
    assert fast_tests(path) == ["test_b"]
    path.write_text("import pytest\n\npytestmark = [pytest.mark.slow]\n\ndef test_a():\n    pass\n")
    assert fast_tests(path) == []
