"""Running a federation: the engines behind ``fed-dfkd simulate`` (DESIGN.md §2).

- ``inprocess`` (:mod:`fed_dfkd.engine.inprocess`): a ``Grid`` that calls the ClientApp in this
  process; fast, deterministic node ids, no Ray;
- ``ray`` (:mod:`fed_dfkd.engine.ray`): Flower's Ray simulation, one CPU per client.

Both run the project's real ServerApp (``server.app``) and ClientApp (``client.app``); the
engine modules are imported only when used, so ``inprocess`` never imports Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

ENGINES = ("inprocess", "ray")


def simulate(
    *,
    config: Path,
    out: Path,
    overrides: Sequence[str] = (),
    engine: str = "inprocess",
    teachers: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Pretrain missing teachers (unless ``teachers`` names a pretrain folder) and run the federation.

    Teachers go to ``out/teachers`` (clients only, cached by config hash). Returns the final
    report, as written to ``out/report.json``. Bad input is a :class:`~fed_dfkd.errors.UserError`.
    """
    from fed_dfkd.config import load_config
    from fed_dfkd.data.datasets import dataset_info
    from fed_dfkd.data.teachers import pretrain_teachers, teacher_path
    from fed_dfkd.errors import UserError
    from fed_dfkd.runtime import resolve_device
    from server.loop import ServerSettings, open_run

    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    cfg = load_config(config, overrides)
    num_clients = cfg.federation.num_clients
    # Refuse a wrong --resume (or an existing run) before spending time on teachers.
    open_run(Path(out), cfg, resume=resume)
    if teachers is None:
        pretrain_teachers(cfg, out, central=False, clients=True, device=resolve_device(cfg.runtime))
        teachers = Path(out)
    else:
        if not Path(teachers).is_dir():
            raise UserError(f"--teachers {teachers}: no such folder; pass the --out folder of a "
                            "`fed-dfkd pretrain` run")
        missing = [teacher_path(teachers, k) for k in range(num_clients)
                   if not teacher_path(teachers, k).is_file()]
        if missing and (Path(teachers) / missing[0].name).is_file():
            raise UserError(f"--teachers {teachers}: no teacher at {missing[0]}: {teachers} looks "
                            f"like the teachers/ folder itself; pass the folder above it, "
                            f"{Path(teachers).parent}")
        if missing:
            raise UserError(f"--teachers {teachers}: no teacher for partition(s) "
                            f"{', '.join(p.stem for p in missing[:5])}; run `fed-dfkd pretrain "
                            f"--config CONFIG --out {teachers}` with federation.num_clients={num_clients}")
        _check_teacher_manifests(teachers, num_clients, dataset_info(cfg.data.dataset))
    settings = ServerSettings(config=Path(config), out=Path(out), overrides=tuple(overrides),
                              teachers=Path(teachers), resume=resume, engine=engine)
    run_config = settings.to_run_config()
    # A simulated run's owners keep their ledgers and states in the run folder: fresh for each
    # experiment, kept across --resume (a real SuperNode keeps them next to its teacher).
    run_config["owner-dir"] = str((Path(out) / "owners").resolve())
    if engine == "inprocess":
        from fed_dfkd.engine.inprocess import run_inprocess

        run_inprocess(run_config, num_nodes=num_clients)
    else:
        from fed_dfkd.engine.ray import run_ray

        run_ray(run_config, num_nodes=num_clients, flwr_home=Path(out).resolve() / ".flwr")
    return json.loads((Path(out) / "report.json").read_text())


def _check_teacher_manifests(teachers: Path, num_clients: int, info: Any) -> None:
    """A UserError, before the federation starts, if a ``--teachers`` teacher's manifest shows it
    was trained on another dataset or image shape (every owner would refuse every round)."""
    from fed_dfkd.data.teachers import TeacherManifest, fit_problems, teacher_path
    from fed_dfkd.errors import UserError

    for k in range(num_clients):
        path = teacher_path(teachers, k).with_suffix(".json")
        try:
            manifest = TeacherManifest.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # no readable manifest beside it: the owner checks the teacher file itself
        problems = fit_problems(manifest, info)
        if problems:
            raise UserError(f"--teachers {teachers}: teacher {teacher_path(teachers, k)} does not "
                            f"fit data.dataset {info.name!r} ({'; '.join(problems)}); pass the "
                            "folder of a `fed-dfkd pretrain` run made with this dataset")


__all__ = ["ENGINES", "simulate"]
