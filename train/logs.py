"""Logging: metrics.jsonl, wandb, a progress display on rank 0, and a plot of the curves at the end."""
import json
import logging
import os
import pathlib
import sys
import time

from tqdm import tqdm

from train.errors import RunError, first_line

log = logging.getLogger(__name__)


class RunLogger:
    """Rank 0's record of a run. Every event goes to metrics.jsonl (one object per line) and wandb."""

    def __init__(self, run_dir: pathlib.Path, config: dict, total_steps: int, enabled: bool,
                 resume_step: int = None, wandb_id: str = None):
        """With `resume_step`, continue a run's record from a checkpoint at that step: metrics.jsonl
        keeps what was logged up to it (later lines, from steps about to be redone, move to
        metrics.abandoned.jsonl) and wandb continues the run `wandb_id`. Without, a fresh start moves
        any earlier attempt's lines there too: metrics.jsonl only ever holds this run's history."""
        self.run_dir, self.total_steps, self.enabled = run_dir, total_steps, enabled
        self.history: list[dict] = []
        self.started = time.time()
        self.first_step = resume_step or 0
        self.wandb_run = self.wandb_id = self.bar = None
        if not enabled:
            return
        self.history = self._rewind(resume_step or 0, fresh=resume_step is None)
        import wandb
        w = config["wandb"]
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self.wandb_run = wandb.init(project=w["project"], entity=w["entity"], mode=w["mode"],
                                        name=config["exp_name"], config=config, dir=str(run_dir), id=wandb_id,
                                        resume="allow" if wandb_id else None)
        except Exception as e:  # no API key, no network, no access to the entity: one line, before the model loads
            raise RunError(f"wandb.mode={w['mode']}: wandb did not start ({type(e).__name__}: "
                           f"{first_line(e)}); use wandb.mode=offline to log locally") from None
        self.wandb_id = self.wandb_run.id
        if sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=self.first_step, desc=config["exp_name"], unit="step",
                            dynamic_ncols=True)

    def _rewind(self, step: int, fresh: bool) -> list[dict]:
        """Keep the lines of metrics.jsonl up to `step` (none if `fresh`); move the rest aside."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines(keepends=True)

        def before(line):  # a line cut short (a kill, a full disk) counts as after
            try:
                return not fresh and line.endswith("\n") and json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                return False

        kept = [line for line in lines if before(line)]
        if len(kept) < len(lines):
            log.warning("%s: moving %d line(s) %s to metrics.abandoned.jsonl", path, len(lines) - len(kept),
                        "of an earlier attempt that left no checkpoint" if fresh else f"logged after step {step}")
            with open(self.run_dir / "metrics.abandoned.jsonl", "a") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in lines if not before(line))
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
        return [json.loads(line) for line in kept]

    def log(self, metrics: dict) -> None:
        """metrics must hold `step`; written as given, shown compactly."""
        if not self.enabled:
            return
        self.history.append(metrics)
        self._append(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        shown = {k: v for k, v in metrics.items() if k in ("loss/train", "loss/eval", "lr", "tokens_per_second")}
        if self.bar is not None:
            self.bar.update(metrics["step"] - self.bar.n)
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in shown.items()})
        else:
            step = metrics["step"]
            elapsed = time.time() - self.started
            fields = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            done = step - self.first_step
            eta = f" eta={elapsed / done * (self.total_steps - step):.0f}s" if done > 0 else ""
            print(f"step {step}/{self.total_steps} {fields}{eta}", flush=True)

    def _append(self, line: str) -> None:
        """Append one whole line to metrics.jsonl, or nothing: a failed write (a full disk) is undone."""
        path = self.run_dir / "metrics.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        try:
            data = line.encode()
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            os.ftruncate(fd, size)
            raise RunError(f"could not write {path}: {e.strerror}") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        plot_curves(self.history, self.run_dir / "curves.png")
        if self.wandb_run is not None:
            self.wandb_run.finish()


def plot_curves(history: list[dict], path: pathlib.Path) -> None:
    """Training and eval loss against step; every other eval metric in a second panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(name):
        points = [(h["step"], h[name]) for h in history if name in h]
        return zip(*points) if points else ((), ())

    other = sorted({k for h in history for k in h if k.endswith("/eval") or "_eval/" in k} - {"loss/eval"})
    fig, axes = plt.subplots(1, 2 if other else 1, figsize=(11 if other else 6, 4), squeeze=False)
    for name in ("loss/train", "loss/eval"):
        axes[0, 0].plot(*series(name), marker="o" if name.endswith("eval") else None, label=name)
    axes[0, 0].set(xlabel="optimizer step", ylabel="loss", title="loss")
    axes[0, 0].legend()
    if other:
        for name in other:
            axes[0, 1].plot(*series(name), marker="o", label=name)
        axes[0, 1].set(xlabel="optimizer step", title="eval metrics")
        axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
