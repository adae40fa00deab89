"""A Weights & Biases run of a cilkit run (``log.wandb: true``), its files under ``<run>/wandb/``.

Fed with the lines of the run's history (:mod:`cilkit.run.history`), as TensorBoard is:

- the run's config (``config.yaml``) as the wandb config;
- per epoch: ``train/loss``, ``train/lr``, ``train/images_per_second``, ``train/state`` and
  each named loss term's mean ``train/term/<name>``,
  against ``train/epoch``, a global epoch counter (1, 2, ... over every fit of the run);
- per state, against ``state/classes_seen``: ``state/top1``, ``state/top1_old`` (from state 2
  on), ``state/top1_new``, ``state/balanced_top1``, ``state/state``, and the accuracy matrix so
  far as the table ``state/accuracy_matrix``;
- after ``cilkit run`` wrote the report, its figures as images ``report/<name>`` in a run
  named ``report`` (:func:`add_report_figures`).

Runs of one protocol share a wandb ``group`` (:func:`protocol_group`: the config's name and a
digest of what ``cilkit compare`` groups runs by); each seed of a method is a run named
``<method>/<seed>`` with ``job_type`` the method. The wandb run's id is kept in
``<run>/wandb/``: a resumed run continues the same wandb run (``resume="allow"``), and the
finished states are logged again only into a wandb run that does not hold them yet (one
switched on at the resume). An interrupted attempt's lines of a state it did not finish stay
in the wandb run (a wandb run cannot take points back).

``log.wandb_mode`` is wandb's ``mode`` (``offline`` by default: nothing leaves the machine
until ``wandb sync``); the ``WANDB_MODE`` variable overrides it, as for any wandb run. The
``wandb`` package is optional (``pip install "cilkit[wandb]"``) and imported only when asked
for; :func:`require` turns its absence into one line naming the config key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from cilkit.common import io
from cilkit.analysis import runsets
from cilkit.settings.config import RunConfig
from cilkit.settings.overrides import method_label
from cilkit.common.errors import UserError, described
from cilkit.run.tensorboard import STATE_SCALARS

RUN_ID = "cilkit-run-id"  # in <dir>/wandb/: the id of the wandb run of a cilkit run
REPORT_ID = "cilkit-report-id"  # ... and of the report's wandb run


def require() -> None:
    """Fail with one line when ``log.wandb`` is set and the package is missing."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError('config key \'log.wandb\': needs the wandb package: pip install "cilkit[wandb]"') from None
    except Exception as e:  # installed but broken
        raise UserError(f"config key 'log.wandb': the wandb package cannot be imported ({described(e)}); "
                        'reinstall it: pip install "cilkit[wandb]"') from None


def files_dir(root: str | os.PathLike) -> Path:
    """Where wandb writes for a run directory given as its ``dir``: wandb's own ``wandb/``."""
    return Path(root) / "wandb"


def config_name(config: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    """The name of the config a run came from (:meth:`RunConfig.for_method` appends
    ``/<method>`` to it), else the dataset's."""
    name, method = config.get("name"), config.get("method")
    if not name or name == method:
        return str(results.get("dataset"))
    suffix = f"/{method}"
    return name[: -len(suffix)] if isinstance(method, str) and name.endswith(suffix) else str(name)


def protocol_group(config: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    """The wandb group of a run: ``<config name>-<digest>``, the digest of the run's protocol
    as ``cilkit compare`` groups by it (:func:`cilkit.analysis.runsets.protocol_key`), so
    that every method and seed of one protocol shares it."""
    digest = hashlib.sha256(runsets.protocol_key(results, config).encode()).hexdigest()[:8]
    return f"{config_name(config, results)}-{digest}"


def _start(root: Path, id_file: str, config: RunConfig, **init: Any) -> tuple[Any, bool]:
    """A wandb run writing under ``root`` (its ``dir``) that continues the one whose id is in
    ``<root>/wandb/<id_file>``, if any; returns it and whether it is a new one."""
    require()
    import wandb

    path = files_dir(root) / id_file
    known = path.read_text().strip() if path.is_file() else None
    # the variable overrides the config, as for any wandb run; read here, not left to wandb, which
    # reads the environment once per process (a later run of a comparison would miss a change)
    init["mode"] = os.environ.get("WANDB_MODE") or config.log.wandb_mode
    io.make_dir(path.parent)
    try:
        run = wandb.init(project=config.log.wandb_project, dir=str(root), id=known, resume="allow",
                         config=config.to_dict(), settings=wandb.Settings(console="off"), **init)
    except Exception as e:  # online without a login, an unreachable server, ...
        raise UserError(f"config key 'log.wandb': wandb could not start a run ({described(e)}); "
                        "log in (wandb login) or set log.wandb_mode=offline") from None
    if known is None:
        io.write_text(path, run.id)
    return run, known is None


def _matrix_table(matrix: list[list[float | None]]) -> Any:
    """The accuracy matrix as a table: a row per finished state, a column per state's classes
    (top-1 % on them after that state; empty where they were not seen yet)."""
    import wandb

    n = len(matrix)
    columns: list[str | int] = ["after state", *[f"state {j + 1}" for j in range(n)]]
    rows = [[b + 1, *row, *[None] * (n - len(row))] for b, row in enumerate(matrix)]
    return wandb.Table(columns=columns, data=rows, allow_mixed_types=True)


class WandbLog:
    """The wandb run of one cilkit run, fed with history lines; a context manager that marks
    the wandb run failed when the states stop on an error."""

    def __init__(self, root: str | os.PathLike, config: RunConfig, results: Mapping[str, Any]) -> None:
        """``results``: the run's results so far (what the protocol group is read from)."""
        assert isinstance(config.method, str)
        label = method_label(config.method, config.to_dict())  # lwf (with memory 200): not lwf's own runs
        self.run, self.empty = _start(Path(root), RUN_ID, config, group=protocol_group(config.to_dict(), results),
                                      name=f"{label}/{config.seed}", job_type=label)
        self.run.define_metric("train/epoch")
        self.run.define_metric("train/*", step_metric="train/epoch")
        self.run.define_metric("state/classes_seen")
        self.run.define_metric("state/*", step_metric="state/classes_seen")

    def epoch(self, line: dict[str, Any], step: int) -> None:
        """One epoch line of the history, the ``step``-th epoch of the run (1, 2, ...)."""
        self.run.log({"train/epoch": step, "train/state": line["state"], "train/loss": line["loss"],
                      "train/lr": line["lr"], "train/images_per_second": line["images_per_second"],
                      **{f"train/term/{name}": value for name, value in line.get("terms", {}).items()}})

    def state(self, line: dict[str, Any], matrix: list[list[float | None]]) -> None:
        """One state line of the history and the accuracy matrix up to that state."""
        data: dict[str, Any] = {"state/classes_seen": line["classes_seen"], "state/state": line["state"]}
        data.update({f"state/{key}": line[key] for key in STATE_SCALARS if line[key] is not None})
        data["state/accuracy_matrix"] = _matrix_table(matrix)
        self.run.log(data)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)

    def __enter__(self) -> WandbLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close(failed=kind is not None)


def add_report_figures(out_dir: str | os.PathLike, report_dir: str | os.PathLike, config: RunConfig) -> list[str]:
    """Every PNG figure of a written report as a ``wandb.Image`` (key ``report/<name>``) in the
    wandb run ``report`` of the runs' protocol group (job type ``report``), its id kept in
    ``<out_dir>/wandb/`` (a resumed comparison logs into the same run). Returns the keys."""
    import wandb

    first = runsets.find_runs([out_dir])[0]  # every run of one config shares its protocol
    run, _ = _start(Path(out_dir), REPORT_ID, config, group=protocol_group(config.to_dict(), first.results),
                    name="report", job_type="report")
    try:
        images = {f"report/{png.stem}": wandb.Image(str(png)) for png in sorted(Path(report_dir).glob("*.png"))}
        run.log(images)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return list(images)
