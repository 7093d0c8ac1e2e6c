"""The Python half of scripts/gpu_campaign.sh: the data bundle, the machine record, one run
with its record, the archive of records, and bringing the records home to docs/runs/.

    python scripts/campaign_tools.py bundle DIR
    python scripts/campaign_tools.py machine OUT_DIR [--need-cuda]
    python scripts/campaign_tools.py run OUT_DIR NAME --plan P --timeout S [--together "N ..."]
                                     [--json-summary] [--archive FILE] -- COMMAND...
    python scripts/campaign_tools.py pack OUT_DIR ARCHIVE
    python scripts/campaign_tools.py home ARCHIVE_OR_DIR [--runs docs/runs] [--tag TAG]

Only ``bundle`` imports capsnet, and only ``machine`` imports torch: the others run between
training runs and should cost nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUNDLED = ("mnist", "fashion-mnist")  # the data sets the campaign trains on
TRAVEL_LIMIT = 64 * 2**20  # bytes of working tree plus data bundle a remote GPU machine accepts
KEEP = ("config.json", "metrics.jsonl", "summary.json", "campaign.json")  # what comes home
KILL_GRACE = 10  # seconds between SIGTERM and SIGKILL for a run past its time


# -- bundle -----------------------------------------------------------------------------

def bundle(folder: Path) -> int:
    """Write each data set's four files, verified by their MD5 through capsnet's own
    sources and gzipped, to ``folder/NAME/``; say loudly what could not be included."""
    sys.path.insert(0, str(REPO / "src"))
    import numpy as np
    from capsnet.data import FILE_NAMES, acquire, read_idx, write_idx
    from capsnet.errors import CapsNetError

    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"data bundle written {time.strftime('%Y-%m-%d %H:%M')} by "
             f"scripts/gpu_campaign.sh bundle"]
    included = []
    for name in BUNDLED:
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):  # "NAME: using SOURCE", for the manifest
                arrays = acquire(name, quiet=False)  # the first source whose MD5s all match
        except CapsNetError as exc:
            lines.append(f"{name}: NOT INCLUDED: {exc}")
            print(f"NOT INCLUDED: {name}: {exc}", file=sys.stderr)
            continue
        for role, array in arrays.items():
            path = folder / name / (FILE_NAMES[role] + ".gz")
            write_idx(path, array)
            # The bytes were verified as acquired; check that the copy reads back the same.
            if not np.array_equal(read_idx(path), array):
                raise SystemExit(f"{path}: does not read back as written")
        size = sum(p.stat().st_size for p in (folder / name).iterdir())
        source = said.getvalue().strip().partition("using ")[2] or "not recorded"
        lines.append(f"{name}: 4 files, {size:,} bytes, MD5-verified from {source}, then gzipped")
        included.append(name)
    bundle_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    tree = tree_bytes()
    lines.append(f"travels: working tree {tree / 2**20:.1f} MiB + bundle "
                 f"{bundle_bytes / 2**20:.1f} MiB = {(tree + bundle_bytes) / 2**20:.1f} MiB "
                 f"of {TRAVEL_LIMIT // 2**20} MiB")
    (folder / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if tree + bundle_bytes > TRAVEL_LIMIT:
        print("too large to travel: the GPU machine would refuse the call", file=sys.stderr)
        return 1
    return 0 if "mnist" in included else 1  # without MNIST there is no campaign


def tree_bytes() -> int:
    """Bytes of the working tree that travels to the GPU machine: tracked files and
    untracked ones git does not ignore (read-only git use)."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / os.fsdecode(p)).stat().st_size for p in listed
               if p and (REPO / os.fsdecode(p)).is_file())


# -- machine ----------------------------------------------------------------------------

def command_output(command: list[str]) -> str | None:
    """The command's stdout, or None when it is missing or fails."""
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def machine(out: Path, need_cuda: bool) -> int:
    """machine.txt (nvidia-smi and lscpu as they print) and machine.json (the facts a run
    record carries) in ``out``."""
    import torch

    smi = command_output(["nvidia-smi"])
    gpus = command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                           "--format=csv,noheader"])
    lscpu = command_output(["lscpu"]) or ""
    cpu = next((line.partition(":")[2].strip() for line in lscpu.splitlines()
                if line.startswith("Model name")), platform.processor() or "not recorded")
    facts = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),              "gpus": gpus.strip().splitlines() if gpus else [], "cpu": cpu,
             "cpus": os.cpu_count(), "python": platform.python_version(),
             "torch": torch.__version__, "cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.json").write_text(json.dumps(facts, indent=2) + "\n")
    (out / "machine.txt").write_text(f"{json.dumps(facts, indent=2)}\n\n$ nvidia-smi\n"
                                     f"{smi or 'not available'}\n$ lscpu\n{lscpu}")
    print(f"machine: {', '.join(facts['gpus']) or 'no GPU'}; {cpu}, {facts['cpus']} CPUs; "
          f"torch {facts['torch']}, CUDA {facts['cuda']}")
    if need_cuda and not facts["cuda_available"]:
        print("this plan needs CUDA, and torch sees none: stopping before any run",
              file=sys.stderr)
        return 1
    return 0


# -- run --------------------------------------------------------------------------------

def shown(command: list[str]) -> str:
    """The command as a person would type it: ``capsnet ...`` for ``python -m capsnet.cli``."""
    if command[1:3] == ["-m", "capsnet.cli"]:
        command = ["capsnet", *command[3:]]
    return shlex.join(command)


def run(out: Path, name: str, plan: str, timeout: float, together: list[str],
        json_summary: bool, archive: Path | None, command: list[str]) -> int:
    """Run ``command`` with its output in OUT/NAME/log.txt, stopped after ``timeout``
    seconds; write OUT/NAME/campaign.json (how it ran) and a line in OUT/campaign.log. With
    ``json_summary`` the command's stdout (``capsnet bench --json``) is the run's summary.
    Always returns 0: one failed run must not stop the others."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    started, began = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    say(f"{time.strftime('%H:%M:%S')} start {name} (at most {timeout:.0f} s): {shown(command)}")
    with open(folder / "log.txt", "wb") as log:
        # A session of its own, so a time-out also stops the compiler workers it starts.
        process = subprocess.Popen(command, stdout=subprocess.PIPE if json_summary else log,
                                   stderr=log, start_new_session=True)
        try:
            stdout, _ = process.communicate(timeout=timeout)
            status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
        except subprocess.TimeoutExpired:
            stop_session(process)
            stdout, status = b"", f"stopped at the part's hard stop after {timeout:.0f} s"
        if json_summary:
            log.write(stdout)
    if json_summary and status == "ok":
        try:
            summary = json.loads(stdout)
        except ValueError:
            status = "failed (its output is not JSON)"
        else:
            write_atomically(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
    seconds = time.monotonic() - began
    facts = json.loads((out / "machine.json").read_text()) if (out / "machine.json").is_file() \
        else None
    record = {"plan": plan, "command": shown(command), "started": started,
              "seconds": round(seconds, 1), "status": status,
              "alongside": [n for n in together if n != name], "machine": facts}
    write_atomically(folder / "campaign.json", json.dumps(record, indent=2) + "\n")
    line = f"{time.strftime('%H:%M:%S')} {name}: {status} in {seconds:.0f} s"
    if status != "ok":
        line += f" (see {folder / 'log.txt'})"
    with open(out / "campaign.log", "a") as campaign_log:
        campaign_log.write(line + "\n")
    say(line)
    if archive is not None:
        pack(out, archive)
    return 0


def say(line: str) -> None:
    """One line in one write: runs that share the machine print at the same time."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def stop_session(process: subprocess.Popen) -> None:
    """SIGTERM to the run's whole process session, SIGKILL if it is still there later."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- pack -------------------------------------------------------------------------------

def pack(out: Path, archive: Path) -> None:
    """Rewrite ``archive`` (.tar.gz) with everything in ``out`` but checkpoints: the GPU
    machine returns at most 8 files, so the records travel home as one. Runs that finish
    together pack one at a time, so the last archive holds every finished run."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with open(out / ".pack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmp = archive.with_name(f".{archive.name}.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(out.rglob("*")):
                if path.is_file() and path.suffix != ".pt" and not path.name.startswith("."):
                    try:
                        tar.add(path, arcname=str(path.relative_to(out)))
                    except FileNotFoundError:  # a running run replaced it meanwhile
                        continue
        os.replace(tmp, archive)


# -- home -------------------------------------------------------------------------------

def home(source: Path, runs: Path, tag: str | None) -> int:
    """Copy each finished run (one with a summary.json) of a campaign archive or output
    folder to ``runs/NAME[-TAG]/``: its config, metrics log, summary and campaign record,
    and the metrics logs of its sub-runs as SUB-metrics.jsonl. Never overwrites a record."""
    with tempfile.TemporaryDirectory() as tmp:
        if source.is_dir():
            out = source
        else:
            with tarfile.open(source) as tar:
                tar.extractall(tmp, filter="data")
            out = Path(tmp)
        status = 0
        for folder in sorted(p for p in out.iterdir() if p.is_dir()):
            if not (folder / "summary.json").is_file():
                record = folder / "campaign.json"
                why = json.loads(record.read_text())["status"] if record.is_file() else "no record"
                print(f"{folder.name}: not brought home, it did not finish: {why}")
                continue
            dest = runs / (f"{folder.name}-{tag}" if tag else folder.name)
            if dest.exists():
                print(f"{folder.name}: {dest} exists already; left as it is", file=sys.stderr)
                status = 1
                continue
            dest.mkdir(parents=True)
            for name in KEEP:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, dest / name)
            for sub in sorted(folder.glob("*/metrics.jsonl")):
                shutil.copyfile(sub, dest / f"{sub.parent.name}-metrics.jsonl")
            print(f"{folder.name}: {dest}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("bundle", help="the verified, gzipped data sets, in a folder")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("machine", help="record the machine in OUT_DIR")
    p.add_argument("out", type=Path)
    p.add_argument("--need-cuda", action="store_true")
    p = sub.add_parser("run", help="run one command of a plan and record it")
    p.add_argument("out", type=Path)
    p.add_argument("name")
    p.add_argument("--plan", required=True)
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--together", default="", help="the runs started at the same time, "
                   "space-separated")
    p.add_argument("--json-summary", action="store_true")
    p.add_argument("--archive", type=Path)
    p = sub.add_parser("pack", help="the records of OUT_DIR as one .tar.gz")
    p.add_argument("out", type=Path)
    p.add_argument("archive", type=Path)
    p = sub.add_parser("home", help="bring finished runs home to docs/runs/")
    p.add_argument("source", type=Path)
    p.add_argument("--runs", type=Path, default=REPO / "docs" / "runs")
    p.add_argument("--tag", help="suffix of the record folders' names, e.g. h100")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)  # run's command follows "--"
    argv, command = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    if args.verb == "bundle":
        return bundle(args.folder)
    if args.verb == "machine":
        return machine(args.out, args.need_cuda)
    if args.verb == "run":
        if not command:
            parser.error("run: give the command after --")
        return run(args.out, args.name, args.plan, args.timeout, args.together.split(),
                   args.json_summary, args.archive, command)
    if args.verb == "pack":
        pack(args.out, args.archive)
        return 0
    return home(args.source, args.runs, args.tag)


if __name__ == "__main__":
    sys.exit(main())
