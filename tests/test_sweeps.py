"""Hydra multirun sweeps (train/sweep.py), run as a user runs them: every job in its own run dir, a
summary of every job in the sweep dir, failures and busy run dirs recorded while the sweep goes on,
colliding run dirs refused before any job, re-runs that skip finished jobs, several ranks, Optuna."""
import csv
import json
import os
import pathlib

import pytest

from conftest import assert_same_weights, compose, weights

# Two optimizer steps per job, light evaluation.
SWEEP = ["model=tiny", "n_examples=16", "model.batch_size=8", "model.eval_batch_size=8", "n_eval_examples=8",
         "n_eval_generations=0", "do_first_eval=false", "wandb.mode=disabled"]


def sweep(runs, tmp_path: pathlib.Path, *args: str):
    run = runs.start("-m", f"cache_dir={tmp_path / 'runs'}", *SWEEP, *args, cwd=tmp_path)
    code = run.wait()
    return code, run.stdout(), run.stderr()


def summary(tmp_path: pathlib.Path) -> list[dict]:
    """The rows of the one sweep summary under the cache dir."""
    (path,) = (tmp_path / "runs" / "sweeps").glob("*/summary.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_2x2_sweep_runs_every_job_in_its_own_dir_with_a_summary_and_a_rerun_skips_them(tmp_path, runs,
                                                                                           small_demo):
    code, out, err = sweep(runs, tmp_path, "loss=dpo,kto", "lr=1e-4,1e-3", *small_demo)
    assert code == 0, err[-3000:]
    jobs = ["dpo-tiny/loss-dpo_lr-0.0001", "dpo-tiny/loss-dpo_lr-0.001", "kto-tiny/loss-kto_lr-0.0001",
            "kto-tiny/loss-kto_lr-0.001"]
    assert sorted(str(p.parent.relative_to(tmp_path / "runs")) for p in (tmp_path / "runs").glob("*/*/FINAL")) == jobs
    rows = summary(tmp_path)
    assert sorted(r["run_dir"] for r in rows) == [str(tmp_path / "runs" / job) for job in jobs]
    for row in rows:
        final = json.loads((pathlib.Path(row["run_dir"]) / "FINAL" / "metrics.json").read_text())
        assert row["status"] == "finished" and row["error"] == ""
        assert float(row["loss/eval"]) == pytest.approx(final["loss/eval"]) and int(row["steps"]) == final["step"] == 2
        assert f"| {row['job']} | finished |" in out  # the table, printed at the end
    # The 4th job, trained after three others in the same process, is the job a run of its own gives.
    from launch import run
    alone = run(compose([f"cache_dir={tmp_path}", "exp_name=alone", *SWEEP, *small_demo, "loss=kto", "lr=1e-3"]))
    assert_same_weights(weights(alone), weights(tmp_path / "runs" / jobs[3] / "FINAL"))

    code, out, err = sweep(runs, tmp_path, "loss=dpo,kto", "lr=1e-4,1e-3", *small_demo)
    assert code == 0, err[-3000:]
    assert out.count("nothing to do") == 4
    again = summary(tmp_path)
    assert [(r["run_dir"], r["status"], r["wall_s"]) for r in again] == [
        (r["run_dir"], r["status"], r["wall_s"]) for r in rows], "the same rows; wall time from the run that trained"


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, runs, small_demo):
    good = small_demo[0].split("=", 1)[1].strip("[]")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{oops\n")
    code, out, err = sweep(runs, tmp_path, f"datasets=[{bad}],[{good}]", small_demo[1])
    assert code == 1, "the sweep's exit status says a job failed"
    failed, finished = summary(tmp_path)
    assert failed["status"] == "failed" and f"{bad}:2: malformed JSON" in failed["error"]
    assert finished["status"] == "finished" and (pathlib.Path(finished["run_dir"]) / "FINAL").is_dir()


def test_jobs_get_a_wandb_run_each_grouped_by_sweep_and_share_cached_reference_log_probs(tmp_path, runs, small_demo):
    code, out, err = sweep(runs, tmp_path, "loss=dpo", "cache_reference_logprobs=true", "lr=1e-4,1e-3",
                           "wandb.mode=offline", *small_demo)
    assert code == 0, err[-3000:]
    assert out.count("reference log-probs: computing") == 1 and out.count("reference log-probs: reusing") == 1
    (sweep_dir,) = (tmp_path / "runs" / "sweeps").iterdir()
    for job in ("lr-0.0001", "lr-0.001"):
        (record,) = (tmp_path / "runs" / "dpo-tiny" / job / "wandb").glob("offline-run-*/run-*.wandb")
        # the group, a string field of the run record: its length byte, then the sweep dir's name
        group = bytes([len(sweep_dir.name)]) + sweep_dir.name.encode()
        assert group in record.read_bytes(), f"{job}'s wandb run is not in the sweep's group"


def test_an_explicit_exp_name_that_jobs_would_share_is_refused_before_any_job(tmp_path, runs):
    code, out, err = sweep(runs, tmp_path, "lr=1e-4,1e-3", "seed=0,1", "exp_name=fixed-seed${seed}")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"config error: exp_name=fixed-seed0: jobs of this sweep would share the run dir "
                          f"{tmp_path / 'runs' / 'fixed-seed0'} (they differ in lr)")
    assert not (tmp_path / "runs").exists()


def test_a_job_whose_run_dir_is_in_use_is_reported_and_the_sweep_goes_on(tmp_path, runs, small_demo):
    from train.rundir import RunLock
    lock = RunLock(tmp_path / "runs" / "sft-tiny" / "lr-0.0001")
    lock.acquire()  # held by this (live) process
    try:
        code, out, err = sweep(runs, tmp_path, "lr=1e-4,1e-3", *small_demo)
    finally:
        lock.release()
    assert code == 1
    busy, finished = summary(tmp_path)
    assert busy["status"] == "in use" and f"is in use by pid {os.getpid()}" in busy["error"]
    assert finished["status"] == "finished" and finished["job"] == "lr-0.001"


def test_a_sweep_under_two_processes_agrees_on_run_dirs_and_writes_one_summary(tmp_path, runs, small_demo):
    ranks = runs.ranks(2, "-m", f"cache_dir={tmp_path / 'runs'}", *SWEEP, "lr=1e-4,1e-3", *small_demo, cwd=tmp_path)
    assert [rank.wait() for rank in ranks] == [0, 0], ranks[0].stderr()[-3000:] + ranks[1].stderr()[-3000:]
    out = ranks[0].stdout() + ranks[1].stdout()
    assert out.count("training on 2 process(es)") == 2 and out.count("sweep summary:") == 1
    rows = summary(tmp_path)
    assert [(r["job"], r["status"]) for r in rows] == [("lr-0.0001", "finished"), ("lr-0.001", "finished")]
    assert sorted(p.parent.name for p in (tmp_path / "runs" / "sft-tiny").glob("*/FINAL")) == ["lr-0.0001", "lr-0.001"]


def test_an_optuna_sweep_runs_three_trials_and_reports_the_best(tmp_path, runs, small_demo):
    code, out, err = sweep(runs, tmp_path, "hydra/sweeper=tune_lr", "hydra.sweeper.n_trials=3", "objective=loss/eval",
                           *small_demo)
    assert code == 0, err[-3000:]
    rows = summary(tmp_path)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"finished"}
    assert all(r["job"].startswith("lr-") for r in rows), "each trial's run dir is named after the lr it tried"
    best = min(float(r["loss/eval"]) for r in rows)
    assert f"best: {best} at {{'lr': " in out, out[-2000:]


def test_an_optimizing_sweeper_without_an_objective_is_refused_before_any_job(tmp_path, runs):
    code, out, err = sweep(runs, tmp_path, "hydra/sweeper=tune_lr")
    assert code == 1 and err.strip() == ("config error: objective: hydra/sweeper=tune_lr optimizes what each job "
                                         "returns: set objective to a final eval metric, e.g. objective=loss/eval")
