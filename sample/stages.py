"""The demo's machinery, shared by every family (sample/demo.py runs it): a training stage as a command with its
config, whether it is done, wall-clock timing, and a stage trained in a child process beside another.

A stage is `python -m <script> --config FILE train.out_dir=... train.resume=auto <overrides>`: the same convention for
every training script (train/common.py), so a stage that was stopped continues, and one that finished is skipped
unless its checkpoint was made with another config, which is refused rather than used or trained over.
"""
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import train.classifier
import train.clip
from core.checkpoint import load_checkpoint
from core.config import config_to_dict, load_config, stored_config_changes

CONFIGS = Path("configs/shapes")


@dataclass
class Stage:
    name: str                 # shown in the log and in metrics.json's stage_seconds
    script: object            # the training script's module (train.vae, ...): script.main(argv) runs it
    config: Path              # its config file
    ckpt: Path                # where its checkpoint goes (train.out_dir = the folder)
    kind: str                 # the checkpoint's kind
    config_cls: type          # the script's config dataclass
    overrides: list = field(default_factory=list)  # key=value after the config file
    filled_in: tuple = ()     # config keys the script sets itself (core.config.config_changes)
    ddp: bool = False         # the script trains under torchrun: on a CPU machine the demo may run it as one process
                              # per core (train_ddp below) instead of one process on every thread

    def __post_init__(self):
        self.overrides = list(self.overrides)  # its own list: the families pass module-level ones (their SMOKE)

    @property
    def argv(self):
        return ["--config", str(self.config), f"train.out_dir={self.ckpt.parent}", "train.resume=auto",
                *self.overrides]

    @property
    def module(self):
        return self.script.__name__  # for `python -m` in a child process

    def done(self):
        return stage_done(self.ckpt, self.kind, self.config_cls, self.argv, self.filled_in)


JUDGE_SMOKE = {  # a few steps and small data: the chain runs end to end in about a minute
    "classifier": ["train.steps=3", "data.num_images=64", "train.eval_images=32", "train.batch_size=16"],
    "judge CLIP": ["train.steps=3", "data.num_images=64", "train.batch_size=16", "train.eval_images=32"],
}


def judges(runs, smoke):
    """The two judges every family is measured by, trained once per runs folder: the shapes attribute classifier
    (prompt accuracy, FID features) and a CLIP trained apart from every generator (CLIP score, R-precision)."""
    return [Stage("classifier", train.classifier, CONFIGS / "classifier.yaml", runs / "shapes_classifier" / "ckpt.pt",
                  "shapes_classifier", train.classifier.ClassifierTrainConfig,
                  JUDGE_SMOKE["classifier"] if smoke else []),
            Stage("judge CLIP", train.clip, CONFIGS / "clip_demo.yaml", runs / "clip_demo" / "ckpt.pt", "clip",
                  train.clip.ClipTrainConfig, JUDGE_SMOKE["judge CLIP"] if smoke else [], train.clip.FILLED_IN)]


# not what a run trained: a moved runs folder, a run resumed in pieces or checkpointed more often, or with its
# convolutions in another memory order (the same function to float rounding) is the same stage
WHERE_AND_HOW = ("train.out_dir", "train.resume", "train.stop_after", "train.ckpt_every", "train.channels_last")


def checkpoint_reference(value):
    """A config value naming a checkpoint: '<path>', or a frozen text encoder's 'lm:<path>' / 'clip:<path>'
    (models/text2image.load_frozen_text_encoder) -> (its kind, '' for a plain path; the path)."""
    kind, sep, path = value.partition(":")
    return (kind, path) if sep and kind in ("lm", "clip") else ("", value)


def same_stage(stored, wanted):
    """`wanted` when both name the checkpoint of one stage of a runs folder (`[lm:|clip:]<folder>/<stage>/ckpt.pt`
    with the same prefix, stage and file), else `stored`: the upstream checkpoints a stage was trained on (vae, dvae,
    clip, text_encoder) are named by their place in the runs folder, so a folder moved, linked or given to --runs in
    another spelling is still done. What the files hold is checked where they are loaded: every script and pipeline
    compares the fingerprint (VAE, dVAE, CLIP) the checkpoint stored at training."""
    if not (isinstance(stored, str) and isinstance(wanted, str)) or not stored.endswith(".pt"):
        return stored
    (k1, a), (k2, b) = checkpoint_reference(stored), checkpoint_reference(wanted)
    return wanted if k1 == k2 and Path(a).parts[-2:] == Path(b).parts[-2:] else stored


def stage_done(ckpt_path, kind, config_cls, argv, filled_in=()):
    """A training stage is done when its checkpoint was made with the config the demo asks for (`argv`: --config FILE
    and overrides; `filled_in`: keys the script sets itself) and reached its last step; a VAE also needs its scale factor, measured after the last step. A
    checkpoint of another config (an older preset, say) is an error: the demo neither uses it nor trains over it."""
    if not Path(ckpt_path).exists():
        return False
    ckpt = load_checkpoint(ckpt_path, kind)
    wanted = config_to_dict(load_config(config_cls, argv[1], argv[2:]))
    stored = {k: same_stage(v, wanted.get(k)) for k, v in ckpt["config"].items()}
    changes = stored_config_changes(config_cls, stored, wanted, filled_in=(*filled_in, *WHERE_AND_HOW))
    if changes:
        raise ValueError(f"{ckpt_path} was trained with another config than the demo's {argv[1]} ({changes}); move "
                         f"its folder away or pass --runs <another folder>")
    return ckpt.get("step") == wanted["train"]["steps"] and (kind != "vae" or ckpt["scale_factor"] is not None)


STAGE_SECONDS = "demo_seconds.json"  # beside a stage's checkpoint: what training it took, when the demo trained it


def keep_stage_seconds(stages, timer):
    """A stage trained now leaves its wall and CPU seconds beside its checkpoint; a stage skipped as done gets them
    back from there into timer.trained_before (absent when it was trained outside the demo), so the comparison
    table still says what each part cost."""
    for stage in stages:
        record = Path(stage.ckpt).parent / STAGE_SECONDS
        wall, cpu = timer.seconds.get(stage.name), timer.cpu_seconds.get(stage.name)
        if wall:  # trained in this run
            record.write_text(json.dumps({"seconds": wall, "cpu_seconds": cpu,
                                          "beside": stage.name in timer.beside}) + "\n")
        elif record.is_file():
            timer.trained_before[stage.name] = json.loads(record.read_text())


def children_cpu_seconds():
    """User + system CPU seconds of this process's finished (waited-for) children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Timer:
    """Wall time of each stage, printed as it ends and kept for metrics.json, and its CPU time (every thread of
    this process, or of the child a Background stage ran in): the cost the families are compared by."""

    def __init__(self):
        self.seconds = {}
        self.cpu_seconds = {}
        self.beside = set()  # stages that ran beside another one: not part of the sum
        self.trained_before = {}  # stages skipped as done: {name: the seconds an earlier demo run recorded}

    def skipped(self, name):
        print(f"\n==== {name}: done before, skipped", flush=True)
        self.seconds[name] = 0.0
        self.cpu_seconds[name] = 0.0

    def run(self, name, fn, skip=False, children=False):
        """fn() timed; children: fn waits for child processes whose CPU time is the stage's (train_ddp)."""
        if skip:
            return self.skipped(name)
        print(f"\n==== {name}", flush=True)
        t0, cpu0, children0 = time.time(), time.process_time(), children_cpu_seconds()
        out = fn()
        self.seconds[name] = round(time.time() - t0, 1)
        self.cpu_seconds[name] = round(time.process_time() - cpu0
                                       + (children_cpu_seconds() - children0 if children else 0.0), 1)
        print(f"==== {name}: {self.seconds[name]:.0f} s", flush=True)
        return out


def child_env():
    """The environment of a stage trained in child processes: one thread each, and this repository importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]))


def train_ddp(stage, processes):
    """`python -m torch.distributed.run --standalone --nproc_per_node P -m <script> <argv>`: the stage as P processes of
    one thread each (DDP over gloo, the global batch split between them), its output on this console. On these CPUs
    the latent U-Net's steps run 1.13x faster so than as one process on two threads, whose second thread adds only
    1.15-1.2x (docs/results.md). Its config is read here first, so that a bad key is one line before any process
    starts; a failure in the processes is a ValueError of one line (Timer.run(children=True) counts their CPU time)."""
    load_config(stage.config_cls, str(stage.config), stage.overrides)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", stage.module, *stage.argv]
    print(f"{processes} processes of one thread (torchrun, gloo): {' '.join(command[1:])}", flush=True)
    code = subprocess.run(command, env=child_env()).returncode
    if code != 0:
        raise ValueError(f"the {stage.name} stage failed under torchrun (exit code {code}; its output is above); "
                         f"run the demo with --sequential to train it in this process")


class Background:
    """One stage, `python -m <module> <args>`, in a child process on one thread while the demo goes on; its output
    goes to <log_dir>/<name>.log. `wait()` returns when it is done, or raises a ValueError (one line, as for bad
    input: a child fails on bad input) with its last line and its log; `stop()` ends it (the demo calls it when its
    own stage fails or is interrupted, so the child does not train on by itself)."""

    def __init__(self, name, module, argv, log_dir, timer):
        self.name, self.timer, self.log = name, timer, Path(log_dir) / (name.replace(" ", "_") + ".log")
        self.command = [sys.executable, "-m", module, *argv]
        self.process = None

    def start(self):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.timer.seconds[self.name] = None  # keeps the report's stage order
        self.timer.cpu_seconds[self.name] = None
        self.timer.beside.add(self.name)
        print(f"\n==== {self.name}: training beside the family's first stage, one thread, log {self.log}", flush=True)
        env = child_env()
        self.t0, self.children_cpu0 = time.time(), children_cpu_seconds()
        with open(self.log, "w") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait()

    def wait(self):
        code = self.process.wait()
        self.timer.seconds[self.name] = round(time.time() - self.t0, 1)
        self.timer.cpu_seconds[self.name] = round(children_cpu_seconds() - self.children_cpu0, 1)
        if code != 0:
            last = (self.log.read_text().strip().splitlines() or [""])[-1]
            raise ValueError(f"the {self.name} stage failed (exit code {code}): {last} (its whole output is in "
                             f"{self.log})")
        print(f"==== {self.name} (beside): {self.timer.seconds[self.name]:.0f} s", flush=True)


class Lane:
    """Stages in a row, each a Background child process on one thread, started in turn by a thread of this process
    while the demo trains a stage of its own (the judges need nothing the family makes).
    `done()` says whether the lane has finished; `wait()` returns when it has, or raises the first stage's error;
    `stop()` ends the running child and starts no other."""

    def __init__(self, stages, log_dir, timer):
        self.stages, self.log_dir, self.timer = list(stages), log_dir, timer
        self.current, self.error, self.stopped = None, None, False
        self.lock = threading.Lock()  # a stop() and the start of the next stage do not interleave
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        for stage in self.stages:  # the report keeps the stages' order, whenever each starts
            self.timer.seconds[stage.name] = self.timer.cpu_seconds[stage.name] = None
            self.timer.beside.add(stage.name)
        self.thread.start()

    def _run(self):
        for stage in self.stages:
            with self.lock:
                if self.stopped:
                    return
                self.current = Background(stage.name, stage.module, stage.argv, self.log_dir, self.timer)
                self.current.start()
            try:
                self.current.wait()
            except BaseException as error:  # kept for wait(), in the demo's own thread
                self.error = error
                return

    def done(self):
        return not self.thread.is_alive()

    def stop(self):
        with self.lock:
            self.stopped = True
            if self.current is not None:
                self.current.stop()
        self.thread.join()

    def wait(self):
        self.thread.join()
        if self.error is not None:
            raise self.error

