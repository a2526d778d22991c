"""Real `launch.py` processes, cheaply: a server imports what launch.py needs once, then forks a fresh
`launch.py <args>` process per request (or the ranks of one distributed job, as torchrun starts them).
Each is a real process to signal and kill -9, and starts in well under a second instead of ~6 s of
imports. Nothing has run a tensor op before the fork, so
the children start with clean thread pools.

A child writes stdout to OUT, stderr to OUT.err, and appends "tokenizer" / "model" to OUT.loaded
whenever it loads one (and "tokenize" whenever it tokenizes data), so a test can tell that a mistake
stopped the run before anything was loaded.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

SERVER = r"""
import json, os, runpy, select, sys, traceback
sys.path.insert(0, sys.argv[1])
import launch, matplotlib.pyplot, wandb
import transformers.models.llama.modeling_llama
from train import checkpoint, data, logs, models, trainers


def noting(name, load):
    def wrapped(*args, **kwargs):
        with open(os.environ["LOADED_MARKER"], "a") as f:
            f.write(name + "\n")
        return load(*args, **kwargs)
    return wrapped


models.load_tokenizer = noting("tokenizer", models.load_tokenizer)
models.load_policy = noting("model", models.load_policy)
data.tokenize = noting("tokenize", data.tokenize)
while True:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if not pid:
            break
        print(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}), flush=True)
    if not select.select([sys.stdin], [], [], 0.01)[0]:
        continue
    request = sys.stdin.readline()
    if not request:
        break
    args, out, cwd, env = json.loads(request)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(cwd)
            os.environ.update(env)
            if "OMP_NUM_THREADS" in env:  # the server's torch read it at import
                import torch
                torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
            os.environ["LOADED_MARKER"] = out + ".loaded"
            for fd, path in ((1, out), (2, out + ".err")):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = [launch.__file__, *args]
            runpy.run_path(launch.__file__, run_name="__main__")  # as `python launch.py ...` would
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
"""


class Runs:
    """Training processes forked from SERVER: start one, signal it, wait for its exit status."""

    def __init__(self, output_dir: pathlib.Path):
        import queue
        import threading
        self.output_dir = output_dir
        self.server = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT)], cwd=ROOT, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env={**os.environ, "WANDB_MODE": "disabled"})
        self.exits: dict[int, int] = {}
        self.started: queue.Queue = queue.Queue()
        # One reader of the server's events: children that end together report together, and a line
        # already in the pipe's read buffer is invisible to select().
        threading.Thread(target=self._read_events, daemon=True).start()

    def _read_events(self) -> None:
        for line in self.server.stdout:
            event = json.loads(line)
            if "exit" in event:
                self.exits[event["pid"]] = event["exit"]
            else:
                self.started.put(event["pid"])

    def start(self, *args: str, cwd: pathlib.Path = ROOT, env: dict = None) -> "Run":
        """`launch.py *args`, run in `cwd` with `env` added to the environment."""
        out = self.output_dir / f"output-{time.time_ns()}.txt"
        self.server.stdin.write(json.dumps([list(args), str(out), str(cwd), env or {}]) + "\n")
        self.server.stdin.flush()
        return Run(self, self.started.get(timeout=60), out)

    def ranks(self, n: int, *args: str, cwd: pathlib.Path = ROOT) -> list["Run"]:
        """`launch.py *args` as the n ranks of one gloo job on CPU, with the environment torchrun gives
        its workers (rank, world size, rendezvous address), one thread each."""
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [self.start(*args, cwd=cwd, env={
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "ACCELERATE_USE_CPU": "true"}) for rank in range(n)]

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=30)


class Run:
    def __init__(self, runs: Runs, pid: int, out: pathlib.Path):
        self.runs, self.pid, self.out = runs, pid, out

    def poll(self):
        """The exit status if the process has ended, else None."""
        return self.runs.exits.get(self.pid)

    def wait(self, timeout=300) -> int:
        deadline = time.time() + timeout
        while self.poll() is None:
            assert time.time() < deadline, f"run {self.pid} timed out:\n{self.output()[-3000:]}"
            time.sleep(0.01)
        return self.runs.exits[self.pid]

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return pathlib.Path(f"{self.out}.err").read_text()

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def loaded(self) -> list[str]:
        """What the run loaded: "tokenizer", "model" (in order)."""
        marker = pathlib.Path(f"{self.out}.loaded")
        return marker.read_text().split() if marker.exists() else []
