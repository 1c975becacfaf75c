"""The head loop, timed: what a user waits for after changing a head param, a head type, or nothing.

Issue 15 asks for the loop a user repeats most (change a head param, see the metric) to finish
in under 15 s end to end on the flower_photos mirror with a warm cache, export included; for a
switch between the logistic and dense heads not to rerun extract_features; and for a
``dvc exp run`` with nothing changed to cost only DVC's own check. This script measures all of
them in one run, side by side:

1. Clones this repository's committed HEAD into a scratch folder (``--workdir``), points the
   params at the offline mirrors (``--shared``: the flower_photos archive and the MobileNetV2
   weights) and runs ``dvc repro`` once: the warm-up, which fills the embedding cache and the
   conversion folder (kept in ``--workdir`` between runs, so only the first run ever is cold).
   The stages run the clone's own code (``PYTHONPATH``), not an editable install's.
2. Runs, in the clone's workspace, one ``dvc exp run`` after the other (each starts from the
   previous one's results, as a user's loop does): a logistic param, a second logistic param,
   the switch to the dense head, a dense param, the switch back to logistic, and no change.

For each it prints the wall and CPU seconds (user + system of every process: on a shared
machine the wall time grows with the load, the CPU time much less), the stages that ran with
each one's wall time (from DVC's "Running stage" line to its "Updating lock file" line), the
rest (DVC's own work: starting, hashing deps, the lock file, the experiment's git commit), and
whether extract_features ran. The CPU (model, CPUs, the flags that move engine speed) and the
load average are printed beside the table: figures from one CPU do not hold on another.

Usage::

    python benchmarks/head_loop.py                              # ../shared, scratch in /tmp
    python benchmarks/head_loop.py --workdir /tmp/loop --shared /work/shared -S split.max_images_per_class=100
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import course_table  # the sibling benchmark: -S parsing, the stages' environment, CPU seconds of children
import yaml

from transferlab.features import cpu

REPOSITORY = Path(__file__).resolve().parents[1]
FLOWERS_SHA256 = "d34b7d1e28f0955715bfd860975c5e30131e7806d227ac6bb49f1ce40be89215"
WEIGHTS_FILE = "mobilenet_v2_1.0_224_imagenet_dequant_no_top.h5"
TARGET_SECONDS = 15.0  # issue 15: a head-param change, end to end, export included
STAGE_LINE = re.compile(r"^Running stage '([^']+)'")
LOOP = (  # (label, what it measures, -S overrides); each runs on the previous one's workspace
    ("logistic param", "head param", {"train_head.logistic.max_iter": "900"}),
    ("logistic param again", "head param", {"train_head.logistic.select_by": "log_loss"}),
    ("switch to dense", "head switch", {"train_head.head": "dense"}),
    ("dense param", "head param", {"train_head.dense.dropout": "0.3"}),
    ("switch to logistic", "head switch", {"train_head.head": "logistic"}),
    ("no change", "no change", {}),
)


@dataclass
class Timing:
    """One ``dvc exp run`` (or the warm-up ``dvc repro``): what ran and how long it took."""

    label: str
    kind: str
    command: list[str]
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds, in the order they ran
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after

    @property
    def dvc_seconds(self) -> float:
        """Everything but the stages' own run: DVC's start, checks, lock files and git work."""
        return self.wall_seconds - sum(self.stages.values())


def prepare(workdir: Path, shared: Path, overrides: dict[str, str]) -> Path:
    """A fresh clone of HEAD in ``workdir/repo`` with params for the offline mirrors, committed."""
    repo = workdir / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    subprocess.run(["git", "clone", "-q", str(REPOSITORY), str(repo)], check=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"].update(source=str(shared / "data" / "flower_photos.tgz"), sha256=FLOWERS_SHA256)
    params["extract_features"]["weights"] = str(shared / "weights" / WEIGHTS_FILE)
    for key, value in overrides.items():
        section = params
        *parents, last = key.split(".")
        for name in parents:
            section = section.setdefault(name, {})
        section[last] = yaml.safe_load(value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(repo, "head_loop benchmark: offline params")
    return repo


def commit(repo: Path, message: str) -> None:
    identity = ["-c", "user.name=head_loop", "-c", "user.email=head_loop@transferlab.invalid"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *identity, "commit", "-qm", message, "--allow-empty"], cwd=repo, check=True)


def environment(repo: Path, workdir: Path) -> dict[str, str]:
    """The stages' environment: the clone's code first, and one embedding cache kept across runs."""
    return {
        **course_table._environment(),
        "PYTHONPATH": str(repo / "src"),
        "TRANSFERLAB_CACHE_DIR": str(workdir / "cache"),
    }


def timed(label: str, kind: str, command: list[str], *, repo: Path, env: dict[str, str]) -> Timing:
    """Runs ``command`` in ``repo``, timing each stage from DVC's own lines; exits on failure."""
    timing = Timing(label, kind, command, load=(os.getloadavg()[0], 0.0))
    print(f"\n$ {' '.join(command)}", flush=True)
    tail: list[str] = []
    running, began = "", 0.0
    cpu_before, started = course_table._children_cpu_seconds(), time.perf_counter()
    with subprocess.Popen(
        command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            now = time.perf_counter() - started
            tail = (tail + [line])[-200:]
            matched = STAGE_LINE.match(line)
            if matched:
                running, began = matched.group(1), now
            elif running and line.startswith(("Updating lock file", "Stage '")):
                timing.stages[running], running = now - began, ""
            shown = ("head:", "best epoch")  # the head's summary; the dense head's epochs run
            if (
                matched
                or line.startswith(("Stage '", "Ran experiment", "[export] agreement"))
                or any(text in line for text in shown)
            ):
                print(f"  {now:6.1f} s  {line.rstrip()}", flush=True)
    timing.wall_seconds = time.perf_counter() - started
    timing.cpu_seconds = course_table._children_cpu_seconds() - cpu_before
    timing.load = (timing.load[0], os.getloadavg()[0])
    if process.returncode != 0:
        sys.exit(f"{label} failed ({process.returncode}):\n{''.join(tail)}")
    return timing


def exp_run(label: str, kind: str, overrides: dict[str, str], *, repo: Path, env: dict[str, str], dvc: str) -> Timing:
    command = [dvc, "exp", "run"] + [part for key, value in overrides.items() for part in ("-S", f"{key}={value}")]
    return timed(label, kind, command, repo=repo, env=env)


def table(timings: list[Timing]) -> str:
    """The runs side by side as Markdown."""
    lines = [
        "| run | kind | wall s | CPU s | train_head s | evaluate s | export s | DVC and the rest s "
        "| extract_features ran | under 15 s | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for timing in timings:
        stage = {name: f"{timing.stages[name]:.1f}" if name in timing.stages else "-" for name in STAGES_SHOWN}
        target = "yes" if timing.wall_seconds < TARGET_SECONDS else "no"
        lines.append(
            f"| {timing.label} | {timing.kind} | {timing.wall_seconds:.1f} | {timing.cpu_seconds:.1f} "
            f"| {stage['train_head']} | {stage['evaluate']} | {stage['export']} | {timing.dvc_seconds:.1f} "
            f"| {'yes' if 'extract_features' in timing.stages else 'no'} "
            f"| {target if timing.kind == 'head param' else ''} | {timing.load[0]:.1f} / {timing.load[1]:.1f} |"
        )
    return "\n".join(lines)


STAGES_SHOWN = ("train_head", "evaluate", "export")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/transferlab-head-loop"), help="scratch folder")
    parser.add_argument(
        "--shared", type=Path, default=REPOSITORY.parent / "shared", help="the mirrors (data/, weights/)"
    )
    parser.add_argument(
        "-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="one more param (repeatable)"
    )
    parser.add_argument("--dvc", default=course_table._default_dvc(), help="the dvc executable")
    arguments = parser.parse_args()
    try:
        overrides = course_table.parse_overrides(arguments.set)
    except ValueError as error:
        parser.error(str(error))
    for needed in (arguments.shared / "data" / "flower_photos.tgz", arguments.shared / "weights" / WEIGHTS_FILE):
        if not needed.is_file():
            parser.error(f"{needed} not found; give --shared the folder holding data/ and weights/")
    workdir = arguments.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    repo = prepare(workdir, arguments.shared.resolve(), overrides)
    env = environment(repo, workdir)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True)
    print(f"transferlab {head.stdout.strip()} cloned into {repo}; embedding cache {workdir / 'cache'}", flush=True)
    warm_up = timed("warm-up (dvc repro)", "warm-up", [arguments.dvc, "repro"], repo=repo, env=env)
    commit(repo, "head_loop benchmark: baseline")
    timings = [exp_run(label, kind, changes, repo=repo, env=env, dvc=arguments.dvc) for label, kind, changes in LOOP]
    print(f"\nCPU: {cpu.current().description}")
    print(f"warm-up: dvc repro {warm_up.wall_seconds:.0f} s ({', '.join(warm_up.stages) or 'nothing ran'})\n")
    print(table(timings))
    switches = [timing for timing in timings if timing.kind == "head switch"]
    print(
        "\nhead-type switch reran extract_features: "
        + ("yes" if any("extract_features" in timing.stages for timing in switches) else "no")
    )


if __name__ == "__main__":
    main()
