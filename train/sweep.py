"""Hydra multirun sweeps: a run dir per job, a summary of every job, failures contained.

Before Hydra starts, `prepare` reads the command line's sweeps. It refuses an explicit `exp_name` that
would put two jobs in one run dir, and tells Hydra the sweep dir (`${cache_dir}/sweeps/<swept keys>-
<hash of the command line>`, the same each time the command runs) and which overrides are the same in
every job. In a job, `run_job` names the job after its own values of the others (Hydra's
override_dirname, so sweeper-chosen values such as Optuna's count too): with the default exp_name the
run dir is `${cache_dir}/${exp_name}/<job>`, e.g. runs/dpo-tiny/loss-dpo_lr-0.001. A job that fails is
recorded with its one-line error and the sweep goes on; each job's row (overrides, status, steps,
wall time, final eval metrics, run dir) goes into the sweep dir's summary.csv and summary.md as it ends.
"""
import csv
import fcntl
import gc
import hashlib
import io
import itertools
import logging
import math
import os
import pathlib
import re
import time
from typing import Optional

from train.errors import ConfigError, RunDirInUse, RunError, first_line

log = logging.getLogger(__name__)

SUMMARY = "summary.csv"
# Overrides that name where a run goes or how it is watched, not what it trains: never part of a job's name.
NOT_IN_NAME = ("exp_name", "cache_dir", "resume", "wandb.mode", "wandb.project", "wandb.entity")
COLUMNS = ["job", "status", "error", "steps", "wall_s", "run_dir", "ended"]


def is_multirun(argv: list[str]) -> bool:
    return "-m" in argv or "--multirun" in argv


def _safe(text: str, limit: int = 80) -> str:
    """`text` as one path component that Hydra overrides can also hold unquoted; long ones end in a hash."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", text)
    if len(safe) > limit:
        safe = f"{safe[:limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return safe


def _overrides(argv: list[str]):
    """The command line's overrides of this trainer's keys (hydra.* left out), parsed: (override, values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from train.config import override_strings
    parsed = []
    for text in override_strings(argv):
        override = OverridesParser.create().parse_overrides([text])[0]
        if override.key_or_group.startswith("hydra") or override.key_or_group.startswith("/hydra"):
            continue
        try:
            values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                      else [override.get_value_element_as_str()])
        except Exception:  # an interval or other range a sweeper samples from: no list of values
            values = []
        parsed.append((override, values))
    return parsed


def prepare(argv: list[str]) -> list[str]:
    """argv for a multirun, with the sweep dir and the keys that are not part of job names added; raise
    ConfigError if an explicit exp_name puts two jobs in one run dir. Run after config.check_command_line."""
    from train.config import compose_config
    parsed = _overrides(argv)
    fixed = [o for o, _ in parsed if not o.is_sweep_override()]
    swept = [(o, values) for o, values in parsed if o.is_sweep_override()]
    if any(o.key_or_group == "exp_name" for o, _ in parsed):
        _refuse_shared_run_dirs(fixed, swept)
    base = compose_config([o.input_line for o in fixed])
    sweeper = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra/sweeper=")), "basic")
    if sweeper != "basic" and not base.objective:
        raise ConfigError(f"objective: hydra/sweeper={sweeper} optimizes what each job returns: set objective to "
                          f"a final eval metric, e.g. objective=loss/eval")
    added = []
    if not any(a.lstrip("+").startswith("hydra.sweep.dir=") for a in argv):
        cache_dir = base.cache_dir
        command = " ".join(sorted(o.input_line for o, _ in parsed))
        name = "+".join(o.key_or_group for o, _ in swept) or "sweep"
        added.append(f"hydra.sweep.dir={pathlib.Path(cache_dir) / 'sweeps' / _safe(name, 40)}-"
                     f"{hashlib.sha1(command.encode()).hexdigest()[:8]}")
    same = sorted({o.key_or_group for o in fixed} | set(NOT_IN_NAME))
    added.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(same)}]")
    return argv + added


def _refuse_shared_run_dirs(fixed: list, swept: list) -> None:
    """Every job's run dir, from its composed config: two jobs in one dir is a mistake to stop at once."""
    from train.config import compose_config
    seen = {}
    for combo in itertools.product(*[[(o.key_or_group, v) for v in values] for o, values in swept]):
        cfg = compose_config([o.input_line for o in fixed] + [f"{k}={v}" for k, v in combo])
        run_dir = pathlib.Path(cfg.cache_dir) / cfg.exp_name
        if run_dir in seen:
            differ = [k for (k, a), (_, b) in zip(seen[run_dir], combo) if a != b]
            raise ConfigError(
                f"exp_name={cfg.exp_name}: jobs of this sweep would share the run dir {run_dir} (they differ in "
                f"{', '.join(differ) or 'nothing'}); put {', '.join(differ) or 'the swept keys'} into exp_name "
                f"(e.g. exp_name=name-{''.join('${' + k + '}' for k in differ[:2])}), or leave exp_name unset "
                f"for a dir per job")
        seen[run_dir] = combo


def _job() -> tuple[str, bool]:
    """This job's name (its swept values) and whether exp_name was given on the command line."""
    from hydra.core.hydra_config import HydraConfig
    hc = HydraConfig.get()
    name = hc.job.override_dirname.replace("=", "-").replace(",", "_")
    explicit = any(o.split("=", 1)[0].lstrip("+~") == "exp_name" for o in hc.overrides.task)
    return _safe(name), explicit


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg, run) -> Optional[float]:
    """One job of a sweep: `run(cfg)` (launch.run) in the job's run dir, its outcome recorded in the
    summary whatever it is. Returns the job's `objective` metric (NaN when it has none: Optuna's
    failed trial)."""
    import torch
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict
    name, explicit = _job()
    if not explicit and name:
        with open_dict(cfg):
            cfg.exp_name = f"{cfg.exp_name}/{name}"
    sweep_dir = pathlib.Path(HydraConfig.get().sweep.dir)
    os.environ["WANDB_RUN_GROUP"] = sweep_dir.name  # one wandb run per job, grouped by sweep
    run_dir = pathlib.Path(cfg.cache_dir) / cfg.exp_name
    row = {"job": name or cfg.exp_name, "run_dir": str(run_dir), "error": ""}
    finished_before = (run_dir / "FINAL").is_dir()
    start = time.time()
    try:
        run(cfg)
        row["status"] = "finished" if (run_dir / "FINAL").is_dir() else "stopped"
    except RunDirInUse as e:
        row |= {"status": "in use", "error": str(e)}
    except RunError as e:
        row |= {"status": "failed", "error": " ".join(str(e).split())}
    except KeyboardInterrupt:
        row["status"] = "stopped"
        raise
    except Exception as e:  # out of memory, a bug: the traceback to the log, one line to the summary
        log.exception("job %s failed", row["job"])
        row |= {"status": "failed", "error": f"{type(e).__name__}: {first_line(e)}"}
    finally:
        gc.collect()  # the job's models and optimizer, before the next job loads its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # a job found finished keeps the wall time of the invocation that trained it
        row["wall_s"] = (next((r["wall_s"] for r in read(sweep_dir) if r["run_dir"] == str(run_dir)), "")
                         if finished_before else f"{time.time() - start:.1f}")
        metrics = _final_metrics(run_dir) if row.get("status") == "finished" else {}
        row["steps"] = metrics.pop("step", "")
        if int(os.environ.get("RANK", "0")) == 0:
            record(sweep_dir, row | {k: v for k, v in metrics.items() if _is_eval(k)})
        if torch.distributed.is_initialized():  # the other ranks see the summary once it holds this job
            torch.distributed.barrier()
    if row["status"] == "failed":
        log.error("job %s failed: %s", row["job"], row["error"])
    if row["status"] == "stopped":  # the process was told to stop: so is the sweep
        raise SystemExit(f"stopped in job {row['job']}: run the same command again to continue the sweep")
    return objective(cfg, metrics)


def objective(cfg, metrics: dict = None) -> Optional[float]:
    """The run's final value of `cfg.objective` (NaN if it has none), or None when no objective is set."""
    if not cfg.objective:
        return None
    metrics = _final_metrics(pathlib.Path(cfg.cache_dir) / cfg.exp_name) if metrics is None else metrics
    value = metrics.get(cfg.objective)
    if metrics and value is None:
        log.warning("objective=%s is not among this run's final metrics (%s): returning NaN", cfg.objective,
                    ", ".join(k for k in sorted(metrics) if _is_eval(k)))
    return float(value) if isinstance(value, (int, float)) else math.nan


def _is_eval(name: str) -> bool:
    return name.endswith("/eval") or "_eval/" in name


def _final_metrics(run_dir: pathlib.Path) -> dict:
    import json
    try:
        return json.loads((run_dir / "FINAL" / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def record(sweep_dir: pathlib.Path, row: dict) -> None:
    """Put `row` into the sweep's summary (replacing the earlier row of the same run dir), under a lock:
    jobs on a cluster end at the same time."""
    import datetime
    row = row | {"ended": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [r for r in read(sweep_dir) if r["run_dir"] != row["run_dir"]] + [row]
        metrics = sorted({k for r in rows for k in r} - set(COLUMNS))
        columns = COLUMNS[:2] + metrics + COLUMNS[2:]
        text = io.StringIO()
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows(rows)
        for path, content in ((sweep_dir / SUMMARY, text.getvalue()), (sweep_dir / "summary.md", table(rows))):
            part = path.with_name(path.name + ".part")
            part.write_text(content)
            os.replace(part, path)


def read(sweep_dir: pathlib.Path) -> list[dict]:
    try:
        with open(sweep_dir / SUMMARY, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def table(rows: list[dict]) -> str:
    """The summary as a Markdown table: job, status, final eval metrics, steps, wall time, run dir, error."""
    metrics = sorted({k for r in rows for k in r if r[k] not in (None, "")} - set(COLUMNS))
    columns = ["job", "status", *metrics, "steps", "wall_s", "run_dir", "error"]

    def cell(value):
        try:
            return f"{float(value):.4g}" if value not in ("", None) and not str(value).isdigit() else str(value or "")
        except ValueError:
            return str(value).replace("|", "\\|")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report(argv: list[str], started: float) -> int:
    """After the sweep: print its summary; the exit status is 1 if a job of this invocation failed."""
    sweep_dir = next(pathlib.Path(a.split("=", 1)[1]) for a in reversed(argv)
                     if a.lstrip("+").startswith("hydra.sweep.dir="))
    rows = read(sweep_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"sweep summary: {sweep_dir / 'summary.md'}")
        print(table(rows), end="")
    best = sweep_dir / "optimization_results.yaml"  # an optimizing sweeper's (Optuna's) answer
    if best.exists() and best.stat().st_mtime >= started and int(os.environ.get("RANK", "0")) == 0:
        import yaml
        result = yaml.safe_load(best.read_text())
        print(f"best: {result.get('best_value')} at {result.get('best_params')} ({best})")
    ours = [r for r in rows if _ended_after(r, started)]
    return int(any(r["status"] in ("failed", "in use") for r in ours))


def _ended_after(row: dict, started: float) -> bool:
    import datetime
    try:
        return datetime.datetime.fromisoformat(row["ended"]).timestamp() >= math.floor(started)
    except (KeyError, ValueError):
        return False
