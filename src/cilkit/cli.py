"""Command line: ``cilkit run | reproduce | tune | calibrate | compare | info | configs``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import yaml

from cilkit.common import distributed
from cilkit.analysis.calibrate import calibrate_run
from cilkit.settings.config import RunConfig, load_config, read_yaml, validate
from cilkit.describe import describe, overview, version_line
from cilkit.common.errors import UserError, did_you_mean
from cilkit.settings.plugins import import_plugins, plugin_failure, plugin_list
from cilkit.analysis.latex import COLUMN_KEYS, DEFAULT_COLUMNS
from cilkit.analysis.report import compare_runs
from cilkit.analysis.paired import PAIRED_METRICS
from cilkit.rundir.layout import LOCK_NAME, DirectoryLock, RunLayout, check_target, fresh_directory, is_run_dir
from cilkit.common.runlog import log
from cilkit.runs.execution import Execution
from cilkit.runs.jobs import JobsFailed
from cilkit.runs.multirun import repeat_dirs, run_methods
from cilkit.runs import reproduce
from cilkit.runs.slurm import SlurmOptions
from cilkit.run.setup import check_protocol, with_resolved_threads
from cilkit.run.store import strict_resume
from cilkit.run.tensorboard import add_report_figures
from cilkit.runs.tune import parse_grid, ranking_table, tune


def cmd_run(args: argparse.Namespace) -> int:
    if args.strict and not args.resume:
        raise UserError("--strict refuses a resume under other code than the run's checkpoints: give it with "
                        "--resume DIR")
    if args.resume:
        with _resume_lock(Path(args.resume)):
            return _run(args)
    return _run(args)


def _resume_lock(run_dir: Path) -> contextlib.AbstractContextManager[object]:
    """The run's lock, taken before ``--resume`` reads anything of the run (its config.yaml,
    marker, checkpoints): a run that another process holds (one replacing it with --overwrite,
    or resuming it too) is one line, never a half-cleared run read. Nothing is locked (or made)
    where no run directory is: the resume itself then says why it cannot continue. Under
    torchrun only rank 0 locks (the ranks have not joined yet: ``RANK`` says which this is)."""
    if not run_dir.is_dir() or run_dir.is_symlink() or (distributed.launched() and os.environ.get("RANK", "0") != "0"):
        return contextlib.nullcontext()
    return DirectoryLock(run_dir, reentrant=True,
                         busy=f"--resume: '{run_dir}' is in use by another cilkit run (another process holds its "
                              f"lock {run_dir / LOCK_NAME}): wait until it ends, or stop it, then resume")


def _run(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.methods:
        overrides.append(f"method=[{args.methods}]")
    if args.resume:
        run_dir, config = _resumed_config(Path(args.resume), args, overrides)
        _check_baseline(args.baseline, config)
        distributed.start(config.device, config.dist_timeout_s)
        dataset = None
    else:
        config = load_config(args.config, overrides, args.plugin)
        _check_baseline(args.baseline, config)  # the cheap checks first: before the data is read
        distributed.start(config.device, config.dist_timeout_s)  # under torchrun: join the other ranks
        if args.out:
            distributed.from_main(lambda: check_target(Path(args.out), args.overwrite))
        dataset = check_protocol(with_resolved_threads(config))  # before any directory is made
        name = config.name or (Path(args.config).stem if args.config else "quickstart")
        run_dir = Path(args.out) if args.out else distributed.from_main(lambda: fresh_directory(Path("runs") / name))
    distributed.resume_hint = f"continue with the same torchrun command and cilkit run --resume {run_dir}"
    try:
        with strict_resume(args.strict):
            run_methods(config, run_dir, resume=bool(args.resume), overwrite=args.overwrite, dataset=dataset,
                        execution=execution_of(args))
    except JobsFailed as e:
        print(f"error: {len(e.failures)} of the runs failed (the others finished):", file=sys.stderr)
        for job, cause in e.failures:
            print(f"  {job.run_dir}: {cause}", file=sys.stderr)
        print(f"after the fix, cilkit run --resume {run_dir} runs the unfinished ones", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if distributed.is_main():
            print(f"interrupted: finished states are saved; continue with cilkit run --resume {run_dir}",
                  file=sys.stderr)
        return 130
    except Exception as e:
        if (line := plugin_error_line(e, run_dir)) is not None:
            print(line, file=sys.stderr)
            return 2
        if not (isinstance(e, RuntimeError) and distributed.lost_contact(e)):
            raise
        print(f"error: rank {distributed.rank()}: {distributed.failure_line(e)}; the finished states are saved: "
              f"{distributed.resume_hint}", file=sys.stderr)
        return 1
    if not distributed.is_main():  # rank 0 writes the tables and the report
        distributed.finish()
        return 0
    print()
    # prints the comparison table; writes run_dir/report (plots, report.html); runs: R > 1 -> every run
    report = compare_runs([run_dir] if config.runs == 1 else repeat_dirs(config, run_dir), RunLayout(run_dir).report,
                          baseline=args.baseline, metric=args.metric)
    if config.log.tensorboard:  # the report's figures beside the runs' events
        add_report_figures(RunLayout(run_dir).tb / "report", report)
    if config.log.wandb:  # ... and in the wandb run "report" of the runs' protocol group
        from cilkit.run import wandb_log

        wandb_log.add_report_figures(run_dir, report, config)
    print(f"\nrun directory: {run_dir}")
    distributed.finish()
    return 0


def plugin_error_line(e: Exception, run_dir: Path) -> str | None:
    """The one line of an exception a plugin's code raised (:func:`plugin_failure`: the hook, the
    file and line) whose traceback the run wrote to its run.log, with the way on; None for any
    other (cilkit's own code raised it, or no run.log holds it: its traceback is printed)."""
    where = plugin_failure(e)
    if where is None or not getattr(e, "_cilkit_logged", False):  # set once runlog wrote its traceback
        return None
    return (f"error: {where}; the traceback is in {RunLayout(run_dir).run_log}; after the fix, resume with: "
            f"cilkit run --resume {run_dir}")


def execution_of(args: argparse.Namespace) -> Execution:
    """``--jobs``, ``--executor`` and the ``--slurm-*`` options as one value."""
    extra = {}
    for item in args.slurm_option or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm-option '{item}': expected KEY=VALUE (a submitit slurm_KEY parameter)")
        extra[key.strip()] = yaml.safe_load(value)
    slurm = SlurmOptions(partition=args.slurm_partition, gpus_per_job=args.slurm_gpus_per_job,
                         cpus_per_job=args.slurm_cpus_per_job, mem_gb=args.slurm_mem_gb, time_min=args.slurm_time,
                         extra=extra)
    return Execution(jobs=args.jobs, executor=args.executor, slurm=slurm)


def add_execution_options(p: argparse.ArgumentParser) -> None:
    """--jobs and the scheduler options, shared by run and tune."""
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run up to N runs at once, each in its own process (on CPU each gets its share of the cores, "
                   "with several GPUs one GPU each); with --executor slurm: at most N cluster jobs at once")
    p.add_argument("--executor", default="local", choices=["local", "slurm"],
                   help="local: this machine; slurm: one SLURM job per run through submitit (pip install 'cilkit[slurm]')")
    p.add_argument("--slurm-partition", metavar="P", help="SLURM partition of the jobs")
    p.add_argument("--slurm-gpus-per-job", type=int, default=0, metavar="G", help="GPUs per SLURM job (default 0)")
    p.add_argument("--slurm-cpus-per-job", type=int, default=1, metavar="C",
                   help="CPUs per SLURM job (default 1; the run's threads when threads is unset)")
    p.add_argument("--slurm-mem-gb", type=float, metavar="GB", help="memory per SLURM job")
    p.add_argument("--slurm-time", type=int, default=24 * 60, metavar="MIN", help="time limit per SLURM job in minutes "
                   "(a job that reaches it is requeued and resumes; default 1440)")
    p.add_argument("--slurm-option", action="append", metavar="KEY=VALUE",
                   help="another submitit slurm_KEY parameter (e.g. account=myproj, qos=high; repeatable)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """--set, --out, --overwrite and --plugin, shared by run and reproduce."""
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable); "
                   "METHOD:KEY=VALUE changes a protocol key for that method's runs alone (--set lwf:memory.total=0)")
    p.add_argument("--out", help="run directory (default: runs/<name>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its files are removed first)")
    p.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE",
                   help="import a .py file or module of your own methods, backbones or datasets first (repeatable)")


def add_reproduce_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", metavar="NAME", help="a paper config's name (--list) or a config file with "
                   "a paper: target")
    p.add_argument("--list", action="store_true", help="list the paper configs: target and compute (images processed)")
    p.add_argument("--seeds", type=int, metavar="N", help="seeds seed, seed+1, ... (default: the paper's number of "
                   f"runs, else the config's runs, else {reproduce.DEFAULT_SEEDS})")
    p.add_argument("--resume", action="store_true", help="continue the interrupted reproduction in --out DIR")
    add_run_options(p)
    add_execution_options(p)
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    """cilkit run's own path (``runs: N``, --jobs/--executor, the report in <out>/report) for a
    config with a ``paper:`` target; ``--list``: the paper configs (:mod:`cilkit.runs.reproduce`)."""
    if args.list:
        if args.config or args.resume:
            raise UserError("--list takes no NAME nor --resume")
        print(reproduce.paper_listing())
        return 0
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: expected a number of seeds >= 1")
    as_run = {**vars(args), "methods": None, "strict": False, "baseline": None, "metric": "top1"}
    if args.resume:
        if not args.out or args.seeds is not None:
            raise UserError("--resume continues the reproduction in --out DIR with the seeds it started with: give "
                            "--out DIR (and no --seeds)")
        reproduce.check_resumable(Path(args.out), args.config)
        return _run(argparse.Namespace(**{**as_run, "config": None, "resume": args.out, "out": None}))
    if args.config is None:
        raise UserError(f"cilkit reproduce NAME: name a paper config; {reproduce.LIST_HINT}")
    overrides = list(args.set or [])
    if any(o.split("=", 1)[0].strip() == "runs" for o in overrides):
        raise UserError("--set runs=N: cilkit reproduce takes the number of seeds as --seeds N")
    path = reproduce.paper_config_path(args.config)
    config = load_config(path, overrides, args.plugin)
    reproduce.require_paper(config, args.config, path)
    seeds = args.seeds or reproduce.default_seeds(config)
    return _run(argparse.Namespace(**{**as_run, "config": str(path), "set": [*overrides, f"runs={seeds}"],
                                      "resume": None}))


def _check_baseline(baseline: str | None, config: RunConfig) -> None:
    if baseline is not None and baseline not in config.method_names:
        hint = did_you_mean(baseline, config.method_names)
        raise UserError(f"--baseline '{baseline}' is not among the run's methods ({', '.join(config.method_names)})"
                        + (f": {hint}" if hint else ""))


def _resumed_config(run_dir: Path, args: argparse.Namespace, overrides: list[str]) -> tuple[Path, RunConfig]:
    """The run's own config.yaml; only ``--set threads=N`` may change it (the thread count
    shapes no setting, though it can move the last digits of the numbers: said in a warning)."""
    if args.config:
        raise UserError("--resume takes the run directory alone (its config.yaml is used)")
    if args.overwrite:
        raise UserError("--resume continues a run; --overwrite replaces one: choose one")
    if args.plugin:
        raise UserError("--resume imports the plugins recorded in the run's config.yaml; --plugin is not taken")
    cfg_file = RunLayout(run_dir).config
    if not is_run_dir(run_dir) or not cfg_file.is_file():
        raise UserError(f"--resume: '{run_dir}' is not a cilkit run directory (no run marker and config.yaml)")
    data = read_yaml(cfg_file)
    other = [o for o in overrides if o.split("=", 1)[0].strip() != "threads"]
    if other:
        raise UserError(f"--resume continues a run as configured; only --set threads=N may change "
                        f"(not '{other[0]}')")
    if overrides:
        config = load_config(str(cfg_file), overrides)
        if config.threads != data.get("threads"):
            log(f"warning: resuming with threads={config.threads} instead of the recorded {data.get('threads')}: "
                 "the numbers of the remaining states may differ in the last digits")
    else:
        config = validate(data, source=str(cfg_file))
    return run_dir, config


def cmd_configs(args: argparse.Namespace) -> int:
    """The packaged configs, each with its one line: what ``cilkit run NAME`` can run."""
    from cilkit.settings.packaged import packaged_configs

    found = packaged_configs()
    width = max(map(len, found), default=0)
    print("\n".join(f"{name:<{width}}  {text}" for name, text in found.items()))
    print("\ncilkit run NAME runs one (a file of that name in the working directory comes first)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import_plugins(plugin_list(args.plugin, Path.cwd(), key="--plugin"))
    print(describe(args.name) if args.name else overview())
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    stem = Path(args.config).stem if args.config else "quickstart"  # no config: the quickstart, as cilkit run
    out = Path(args.out) if args.out else fresh_directory(Path("runs") / f"tune-{stem}")
    execution, overrides = execution_of(args), list(args.set or [])
    if args.search:
        from cilkit.runs.search import search

        record = search(args.config, parse_grid(args.grid, required=False), args.range or [], overrides, out,
                        args.search, args.trials, execution, args.plugin, args.metric)
    else:
        if args.range:
            raise UserError("--range samples a space: give --search random|tpe (a grid takes --grid values)")
        record = tune(args.config, args.grid or [], overrides, out, execution, args.plugin, args.metric)
    print()
    print(ranking_table(record["ranking"], record["metric"]))
    if record["verdict"] == "tie":
        a, b = record["ranking"][:2]
        print(f"\ntie on validation ({record['metric']}): the first two are within their seed noise "
              f"({_score(a)} vs {_score(b)}); more seeds (--set runs=R) may separate them. First: {record['set_line']}")
    else:
        print(f"\nchosen on validation ({record['metric']}): {record['set_line']}")
    if record.get("caveat"):  # one seed per point, grid or --search: the choice may be seed noise
        print(f"caveat: {record['caveat']}")
    print(f"ranking: {out / 'ranking.md'} and ranking.json")
    return 0


def _score(row: dict) -> str:
    std = row["val_score_std"]
    return f"{row['val_score_mean']:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def cmd_calibrate(args: argparse.Namespace) -> int:

    calibrate_run(Path(args.run_dir), args.rectifier, Path(args.out) if args.out else None)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    compare_runs([Path(d) for d in args.dirs], Path(args.out) if args.out else None, baseline=args.baseline,
                 metric=args.metric, y_range=args.y_range,
                 columns=None if args.columns is None else args.columns.split(","), variants=not args.no_variants,
                 regimes=args.regimes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cilkit", description="Class-incremental learning under imbalance.")
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a protocol (default: the embedded digits quickstart)")
    r.add_argument("config", nargs="?", help="YAML config file, or a packaged config's name (cilkit configs "
                   "lists them; default: the embedded quickstart)")
    add_run_options(r)
    r.add_argument("--methods", help="comma-separated methods to compare on the same protocol")
    r.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its last finished state")
    r.add_argument("--strict", action="store_true", help="with --resume: refuse to continue under other code (cilkit "
                   "or a plugin edited since the finished states ran) instead of warning")
    r.add_argument("--baseline", metavar="METHOD", help="also compare every other method with this one, "
                   "paired by seed (with runs: R > 1)")
    r.add_argument("--metric", default="top1", choices=PAIRED_METRICS, help="the figure --baseline pairs: "
                   "the mean incremental top-1 (default) or balanced top-1, excluding state 1 (long-tailed runs: "
                   "also <many|medium|few>_shot_top1, and last_<group>_shot_top1 after the last state)")
    add_execution_options(r)
    r.set_defaults(func=cmd_run)
    add_reproduce_options(sub.add_parser("reproduce", help="run a paper config over several seeds, its report beside "
                                         "the paper's figure"))
    t = sub.add_parser("tune", help="rank a grid of settings by validation accuracy (never the test set)")
    t.add_argument("config", nargs="?", help="YAML config file or a packaged config's name (one method, "
                   "scenario.val_per_class >= 1; default: the embedded quickstart, as cilkit run)")
    t.add_argument("--grid", action="append", metavar="KEY=V1,V2,...", help="values to try (repeatable: all combinations)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key for every point")
    t.add_argument("--out", help="where the runs and the ranking go (default: runs/tune-<config>)")
    t.add_argument("--search", choices=["random", "tpe"], help="sample the space with Optuna instead of the grid "
                   "(--grid values as choices, --range KEY=LOW:HIGH[:log] as numbers; pip install 'cilkit[tune]')")
    t.add_argument("--trials", type=int, default=20, metavar="T", help="trials of --search (default 20)")
    t.add_argument("--range", action="append", metavar="KEY=LOW:HIGH[:log]", help="a numeric range of --search "
                   "(an integer range when both bounds are integers; repeatable)")
    t.add_argument("--metric", default="top1", choices=["top1", "balanced_top1"],
                   help="the validation score ranked (default top1; balanced_top1: the mean per-class accuracy)")
    t.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE",
                   help="import a .py file or module of your own methods, backbones or datasets first (repeatable)")
    add_execution_options(t)
    t.set_defaults(func=cmd_tune)
    c = sub.add_parser("calibrate", help="rectify the stored scores of a finished run, without a model")
    c.add_argument("run_dir", help="a run directory (or a parent of several)")
    c.add_argument("--with", dest="rectifier", required=True, help="il2m | scaling | scail | none")
    c.add_argument("--out", help="where to write (default: RUN_DIR/calibrated/<rectifier>)")
    c.set_defaults(func=cmd_calibrate)
    k = sub.add_parser("compare", help="tables (Markdown, CSV, LaTeX), plots and report.html over run directories")
    k.add_argument("dirs", nargs="+", help="run directories (or parents of several)")
    k.add_argument("--out", help="where to write the report (default: a new runs/compare-<A>-<B>; "
                   "with one DIR, DIR/report)")
    k.add_argument("--regimes", action="store_true", help="runs whose training settings (train.*) differ are one "
                   "protocol: each method in its own regime, as docs/regimes.md's rule sets it; the table names the "
                   "settings in which each method's training differs")
    k.add_argument("--baseline", metavar="METHOD", help="paired difference of every other method from this "
                   "one over their shared seeds, with a 95%% confidence interval (paired.csv)")
    k.add_argument("--metric", default="top1", choices=PAIRED_METRICS, help="the figure --baseline pairs: "
                   "the mean incremental top-1 (default) or balanced top-1 (mean per-class accuracy), excl. state 1 "
                   "(long-tailed runs: also <many|medium|few>_shot_top1, and last_<group>_shot_top1 after the last "
                   "state)")
    k.add_argument("--y-range", default="fit", choices=["fit", "full"], help="accuracy axes of the figures: "
                   "fitted to the data (default) or 0-100")
    k.add_argument("--columns", metavar="NAME,...", help="the columns of table.tex after the method (default "
                   f"{','.join(DEFAULT_COLUMNS)}; known: {', '.join(COLUMN_KEYS)})")
    k.add_argument("--no-variants", action="store_true", help="table.tex without the variant rows (method [x])")
    k.set_defaults(func=cmd_compare)
    i = sub.add_parser("info", help="list datasets, methods, backbones and selection strategies")
    i.add_argument("name", nargs="?", help="a method, dataset or backbone to describe")
    i.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE",
                   help="import a .py file or module of your own first, to list its entries (repeatable)")
    i.set_defaults(func=cmd_info)
    g = sub.add_parser("configs", help="list the packaged configs (cilkit run NAME runs one)")
    g.set_defaults(func=cmd_configs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _run_command(args)
    finally:
        joined = distributed.stop()
    if joined:  # a torchrun worker: leave before the interpreter's teardown (see exit_process)
        distributed.exit_process(code)
    return code


def _run_command(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except UserError as e:
        if distributed.is_main():  # every rank raises it; one prints it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
