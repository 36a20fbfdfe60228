"""Time per round and peak memory of `fed-dfkd simulate` for several federation sizes and
engines, and the in-process overhead against `fed-dfkd distill` doing the same work.

    python bench/federation_scale.py --config configs/quickstart.yaml --out runs/bench/scale \
        --clients 10,50,100 --sample-rate 0.1 --rounds 6 --engines inprocess,ray \
        --set data.partition=iid --set distill.ensemble=mean

Each configuration runs in its own process tree (one `fed-dfkd` command). Peak memory is the
largest sum of the resident set sizes of that tree (the command and, under Ray, every worker
and daemon it starts), sampled every 0.1 s from /proc. Time per round is the median of the
server's per-round ``seconds`` (plan, exchange, aggregation, student steps; evaluation and
checkpointing excluded), with the first round left out (it loads teachers and warms caches);
wall time is the whole command. Teachers are pretrained once per size, before the timed runs.

``--overhead`` adds the comparison the issue asks for: a one-client, sample-rate-1 federation
(in-process) against `fed-dfkd distill` from that same client teacher, same seed and rounds:
the same generator and student steps (tests/oracle shows they give the same student), so the
ratio of their per-round times is what the federation machinery costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FED_DFKD = [sys.executable, "-m", "fed_dfkd.cli.main"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                resident = int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = resident
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_measured(command: list[str], log: Path) -> tuple[float, int]:
    """Run ``command``; (wall seconds, peak tree RSS bytes)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        while process.poll() is None:
            peak = max(peak, _tree_rss(process.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); see {log}")
    return wall, peak


def round_seconds(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(line)["seconds"]) for line in lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--clients", default="10,50,100")
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--engines", default="inprocess")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--set", dest="common", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    common = [f"federation.rounds={args.rounds}", "runtime.progress=lines", *args.common]
    sets = lambda items: [a for item in items for a in ("--set", item)]
    rows = []
    for n in [int(c) for c in args.clients.split(",") if c]:
        size = [f"federation.num_clients={n}", f"federation.sample_rate={args.sample_rate}", *common]
        teachers = out / f"teachers_{n}"
        if not (teachers / "teachers" / f"client_{n - 1}.pt").exists():
            run_measured([*FED_DFKD, "pretrain", "--config", args.config, "--out", str(teachers),
                          *sets(size)], teachers / "pretrain.log")
        for engine in [e for e in args.engines.split(",") if e]:
            run = out / f"{engine}_{n}"
            if run.exists():
                subprocess.run(["rm", "-rf", str(run)], check=True)
            wall, peak = run_measured(
                [*FED_DFKD, "simulate", "--config", args.config, "--out", str(run), "--engine", engine,
                 "--teachers", str(teachers), *sets(size)], out / f"{engine}_{n}.log")
            seconds = round_seconds(run)
            report = json.loads((run / "report.json").read_text())
            rows.append({
                "clients": n, "engine": engine, "sampled": round(n * args.sample_rate),
                "round_s": statistics.median(seconds[1:] or seconds), "first_round_s": seconds[0],
                "wall_s": wall, "peak_rss_mib": peak / 2**20,
                "bytes_per_round": report["bytes_per_round"],
            })
            print(json.dumps(rows[-1]), flush=True)
    if args.overhead:
        one = [f"federation.num_clients=1", "federation.sample_rate=1", "federation.min_replies=1",
               "distill.teacher_source=clients", *common]
        teachers = out / "teachers_1"
        if not (teachers / "teachers" / "client_0.pt").exists():
            run_measured([*FED_DFKD, "pretrain", "--config", args.config, "--out", str(teachers),
                          *sets(one)], teachers / "pretrain.log")
        for command in ("distill", "simulate"):
            run = out / f"overhead_{command}"
            if run.exists():
                subprocess.run(["rm", "-rf", str(run)], check=True)
            wall, peak = run_measured(
                [*FED_DFKD, command, "--config", args.config, "--out", str(run), "--teachers",
                 str(teachers), *sets(one)], out / f"overhead_{command}.log")
            seconds = round_seconds(run)
            rows.append({"clients": 1, "engine": command, "sampled": 1,
                         "round_s": statistics.median(seconds[1:] or seconds),
                         "first_round_s": seconds[0], "wall_s": wall, "peak_rss_mib": peak / 2**20,
                         "bytes_per_round": json.loads((run / "report.json").read_text()).get("bytes_per_round")})
            print(json.dumps(rows[-1]), flush=True)
    (out / "scale.json").write_text(json.dumps(rows, indent=1))
    header = "| clients | engine | sampled / round | s / round (median) | first round s | wall s | peak RSS MiB | bytes / round |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['engine']} | {r['sampled']} | {r['round_s']:.3f} | "
                     f"{r['first_round_s']:.2f} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['bytes_per_round'] if r['bytes_per_round'] is None else int(r['bytes_per_round'])} |")
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
