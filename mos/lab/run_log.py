"""What a job leaves behind for a person to follow it: the merged configuration, echoed when the
job starts and saved beside its results, and one CSV of per-epoch numbers for every run.

The epoch CSV is rewritten whole from the run's state after every epoch (atomically, so a reader
never sees half a file), so a resumed run's file holds every epoch once, before and after the
resume alike.
"""
from __future__ import annotations

import csv
import functools
import io
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional, Union

import torch

from mos.lab.config import RunConfig
from mos.lab.config_io import dump_yaml
from mos.lab.files import write_atomic

CONFIG_FILE = "config.yaml"
# The fixed columns of an epoch CSV; one `aux_<name>` column per auxiliary loss term follows
# `bce` (the layer's weighted terms: load balance, commitment, ...), then the validation AUC
# that early stopping watches and the epoch's wall-clock seconds.
EPOCH_COLUMNS = ("epoch", "objective", "bce")


def machine(device: Union[str, torch.device] = "cpu") -> str:
    """The machine a run trains on, as far as it decides the numbers: the same code, seed and
    configuration give bit-equal runs on one machine, but CPUs whose kernels torch dispatches
    differently (`torch.backends.cpu.get_cpu_capability()`: AVX2, AVX512, ...) round differently,
    as do GPUs of other kinds, and training drifts apart after a few epochs. `device`: the run's
    device (on CUDA the GPU and CUDA version are named too). A resumed run names the machine that
    finished it."""
    model = None
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        pass
    model = model or platform.processor() or "unknown CPU"
    text = (f"{platform.machine()}, {model}, {os.cpu_count()} CPUs, {platform.system()}, torch {torch.__version__}, "
            f"CPU kernels {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)")
    device = torch.device(device)
    # A report of CUDA runs may be written where no GPU is (`--report-only`): name none then.
    if device.type == "cuda" and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return text


# The checkout the package runs from; an installed copy (site-packages) has no .git beside it,
# and must not report the commit of a repository it happens to sit in (a venv inside a checkout).
_ROOT = Path(__file__).resolve().parents[2]
# Where there is no checkout (a copy of the tree on a lent machine), whoever starts the job can
# name the code: MOS_CODE_VERSION=<commit>.
CODE_VERSION_VARIABLE = "MOS_CODE_VERSION"


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The code this process trains with: $MOS_CODE_VERSION if set, else the checkout's commit,
    with " with uncommitted changes" when a tracked file (code, docs or results alike) differs
    from it, else "unknown (not a git checkout)". Read once per process, on the first call
    (`train_one` makes it before training), so a commit made while a run trains is not named;
    a resumed run names the code that resumed it, as `machine()` names the machine. A run read
    back from an earlier profile keeps the commit it trained at, which the profile's own commit
    (the report's) does not tell."""
    if os.environ.get(CODE_VERSION_VARIABLE):
        return os.environ[CODE_VERSION_VARIABLE]
    return describe_checkout(*checkout())


def checkout() -> tuple[str, Optional[bool]]:
    """(the package checkout's commit, whether a tracked file differs from it); ("", None) where
    there is no checkout."""
    commit = git("rev-parse", "HEAD")
    if not commit:
        return "", None
    return commit, bool(git("status", "--porcelain", "--untracked-files=no"))


def describe_checkout(commit: str, uncommitted_changes: Optional[bool]) -> str:
    """`checkout()` in words: the commit, "<commit> with uncommitted changes", or "unknown (not a
    git checkout)"."""
    if not commit:
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes" if uncommitted_changes else "")


def git(*args: str) -> str:
    """`git <args>` in the package's checkout: its stdout stripped, or "" where git or the
    checkout (a .git beside the package) is missing or the command fails. Takes no optional
    lock (`git status` would otherwise refresh the index, and a user's `git commit` meanwhile
    could find it locked)."""
    if not (_ROOT / ".git").exists():
        return ""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(_ROOT), *args], capture_output=True,
                              text=True, timeout=30, env=env)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def echo_config(run_cfg: RunConfig, out_dir: Path) -> Path:
    """Print the merged configuration to stdout, with the data's statistics and the results
    table (stderr keeps the epoch lines and a refusal's one error line), as YAML, the form
    `--config` reads back, and save it as `<out_dir>/config.yaml`; returns that path. Called
    by one process (rank 0 under torchrun) once the data has loaded."""
    text = dump_yaml(run_cfg)
    path = Path(out_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    print(f"configuration (saved to {path}):\n" + "".join(f"  {line}\n" for line in text.splitlines()).rstrip(),
          flush=True)
    return path


def epoch_rows(state) -> list[dict]:
    """One dict per finished epoch of `state` (`mos.lab.run_state.RunState`): objective (the
    loss minimised: BCE of every candidate plus the weighted aux terms), the BCE of the model's
    training prediction (for a boosted kind its backbone candidate, which early stopping
    watches: the corrected candidate is chosen only at the end), each aux term, the watched
    validation AUC and the seconds."""
    rows = []
    for at, objective in enumerate(state.train_loss):
        row = {"epoch": at + 1, "objective": objective, "bce": state.train_bce[at]}
        for name, values in sorted(state.train_aux.items()):
            row[f"aux_{name}"] = values[at]
        row["valid_auc"] = state.valid_auc[at]
        row["seconds"] = state.epoch_seconds[at]
        rows.append(row)
    return rows


def write_epochs(path: Path, state) -> None:
    """Write every finished epoch of `state` to the CSV at `path` (replacing it)."""
    rows = epoch_rows(state)
    if not rows:
        return
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: _cell(value) for key, value in row.items()} for row in rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, stream.getvalue())


def epoch_line(kind: str, seed: int, epoch: int, max_epochs: int, objective: float, bce: float, aux: dict,
               valid_text: str, seconds: float, improved: bool) -> str:
    """The epoch's log line. BCE first (comparable across model kinds); the auxiliary terms and
    the objective only where the model has them, so a sum that is mostly auxiliary loss is never
    read as the training loss."""
    parts = [f"{kind} seed {seed} epoch {epoch}/{max_epochs}: train BCE {bce:.4f}"]
    if aux:
        parts.append("aux " + " ".join(f"{name} {value:.4f}" for name, value in sorted(aux.items())))
    if aux or not math.isclose(objective, bce, rel_tol=1e-6, abs_tol=1e-9):
        parts.append(f"objective {objective:.4f}")
    parts.append(f"valid AUC {valid_text}")
    parts.append(f"{seconds:.1f}s wall" + ("  *" if improved else ""))
    return "  ".join(parts)


def _cell(value: Optional[float]):
    return "" if value is None else value
