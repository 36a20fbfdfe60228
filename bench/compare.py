"""Run `fed-dfkd distill` for several methods / seeds / overrides at an equal budget and
tabulate the reports (markdown + CSV), with wall times.

    python bench/compare.py --config configs/fmnist_lenet5.yaml --out runs/bench/fmnist \
        --variant adadfkd:method.name=adadfkd --variant cudfkd:method.name=cudfkd \
        --seeds adadfkd=0,1,2

Every variant shares one teacher folder, so the table compares distillation only: pretrained
once, first, into OUT/teachers-run, or an existing one given by ``--teachers`` (a folder with
``teachers/central.pt``, as `fed-dfkd pretrain --central` or an earlier run leaves it). A run
whose OUT/NAME-seedS/report.json is complete is reused, not run again (refused if it was made
under another config or on other teachers). Runs go one after another (``--jobs 2`` runs two
at a time with one thread each, which is what a 2-core machine can do without oversubscription).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fed_dfkd.errors import UserError

FED_DFKD = [sys.executable, "-m", "fed_dfkd.cli.main"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition(":")
    return name, [s for s in sets.split(",") if s]


def finished_report(config: str, out: Path, teachers: Path, overrides: list[str]) -> dict | None:
    """The report of a run that finished earlier in ``out``, to reuse; ``None`` if there is none.
    A finished run made under another config or with other teachers raises ValueError: reusing it
    would put another experiment's number in the table."""
    from fed_dfkd.config import load_config
    from fed_dfkd.runtime import resume_key

    if not (out / "report.json").exists():
        return None
    earlier = json.loads((out / "report.json").read_text())
    if earlier.get("rounds_completed") != earlier.get("rounds_total"):
        return None  # unfinished: run_one resumes it (distill --resume checks its config)
    if resume_key(load_config(out / "config.resolved.yaml")) != resume_key(load_config(config, overrides)):
        raise ValueError(f"{out} holds a finished run made under another config than this variant's; "
                         "delete it or choose another --out")
    if earlier.get("teachers_dir") != str(teachers.resolve()):
        raise ValueError(f"{out} holds a finished run on the teachers in {earlier.get('teachers_dir')}, "
                         f"not {teachers.resolve()}; delete it or choose another --out")
    return earlier


def run_one(config: str, out: Path, teachers: Path, overrides: list[str], threads: int,
            earlier: dict | None) -> dict:
    if earlier is not None:
        return earlier
    command = [*FED_DFKD, "distill", "--config", config, "--out", str(out), "--teachers", str(teachers),
               "--set", f"runtime.threads={threads}", "--set", "runtime.progress=lines"]
    if (out / "checkpoints" / "last.pt").exists():
        command.append("--resume")
    for item in overrides:
        command += ["--set", item]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.log", "a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads((out / "report.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME:section.key=value,section.key=value")
    parser.add_argument("--seeds", action="append", default=[],
                        help="NAME=0,1,2 (default: seed 0 only)")
    parser.add_argument("--set", dest="common", action="append", default=[],
                        help="override applied to every run")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--teachers", help="reuse this teacher folder instead of pretraining one")
    args = parser.parse_args()

    out = Path(args.out)
    teachers = Path(args.teachers) if args.teachers else out / "teachers-run"
    if args.teachers and not (teachers / "teachers" / "central.pt").is_file():
        parser.error(f"--teachers {teachers}: no teachers/central.pt there")
    seeds = {name: [int(s) for s in values.split(",")]
             for name, values in (item.split("=", 1) for item in args.seeds)}
    jobs = []
    for text in args.variant:
        name, overrides = parse_variant(text)
        for seed in seeds.get(name, [0]):
            jobs.append((name, seed, [*args.common, *overrides, f"runtime.seed={seed}"]))
    try:  # before any work: a stale run is refused, not tabulated
        earlier = [finished_report(args.config, out / f"{name}-seed{seed}", teachers, overrides)
                   for name, seed, overrides in jobs]
    except (ValueError, UserError) as error:  # UserError: a bad --config or --set
        parser.error(str(error))
    if not args.teachers:
        subprocess.run([*FED_DFKD, "pretrain", "--config", args.config, "--out", str(teachers), "--central",
                        "--no-clients", "--set", "runtime.threads=1",
                        *sum((["--set", s] for s in args.common), [])], check=True)
    threads = 1 if args.jobs > 1 else 2
    started = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        reports = list(pool.map(
            lambda job, reuse: run_one(args.config, out / f"{job[0]}-seed{job[1]}", teachers, job[2],
                                       threads, reuse), jobs, earlier))
    rows = []
    for (name, seed, _), report in zip(jobs, reports):
        rows.append({"variant": name, "seed": seed, "student_accuracy": report["student_accuracy"],
                     "best_student_accuracy": report["best_student_accuracy"],
                     "teacher_accuracy": report["best_teacher_accuracy"],
                     "ratio": report["student_to_teacher"], "agreement": report["agreement"],
                     "probability_loyalty": report["probability_loyalty"],
                     "rounds": report["rounds_completed"], "wall_seconds": report["wall_seconds"]})
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| variant | seeds | student accuracy | x teacher | Agree@1 | L_p | wall s / run |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == name]

        def stat(key: str, digits: int = 4) -> str:
            values = [r[key] for r in group]
            if len(values) == 1:
                return f"{values[0]:.{digits}f}"
            return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

        lines.append(f"| {name} | {len(group)} | {stat('student_accuracy')} | {stat('ratio', 3)} | "
                     f"{stat('agreement')} | {stat('probability_loyalty')} | {stat('wall_seconds', 0)} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
