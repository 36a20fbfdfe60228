"""``fed-dfkd distill --config C --out DIR``: centralised data-free distillation.

From one central teacher (``distill.teacher_source: central``) or from the ensemble of the
owners' teachers (``clients``), in one process: the reference a federated run is checked
against. Missing teachers are pretrained first (cached by config hash). ``--resume`` continues
from the last completed round; a folder that already holds a run is never overwritten.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from fed_dfkd.cli.common import add_config_arguments, config_from_args, prepare_out_dir

logger = logging.getLogger("fed_dfkd.cli.distill")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("distill", help="centralised data-free distillation (the reference)")
    add_config_arguments(parser)
    parser.add_argument("--teachers", metavar="DIR", default=None,
                        help="folder of a `fed-dfkd pretrain` run (default: DIR/teachers under --out)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.set_defaults(handler=run)


def _check_teachers_fit(cfg, info, loaded: list, teacher_dir: Path) -> None:
    """A UserError if a teacher of ``--teachers`` was trained on another dataset or image shape
    (it would run, with meaningless accuracies). Another architecture than ``models.teacher``
    only gets a warning: the run is valid for the teachers it used."""
    from fed_dfkd.data.teachers import fit_problems, teacher_path
    from fed_dfkd.errors import UserError

    for _, manifest in loaded:
        path = teacher_path(teacher_dir, manifest.partition_id)
        problems = fit_problems(manifest, info)
        if problems:
            raise UserError(f"--teachers {teacher_dir}: teacher {path} does not fit data.dataset "
                            f"{info.name!r} ({'; '.join(problems)}); pass the folder of a "
                            "`fed-dfkd pretrain` run made with this dataset")
        if manifest.architecture != cfg.models.teacher:
            logger.warning("teacher %s is a %s, but models.teacher is %s: the run uses the teacher "
                           "as it is", path, manifest.architecture, cfg.models.teacher)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.teachers is not None and not Path(args.teachers).is_dir():
        from fed_dfkd.errors import UserError

        raise UserError(f"--teachers {args.teachers}: no such folder; pass the --out folder of "
                        "a `fed-dfkd pretrain` run")
    out = prepare_out_dir(args.out)

    # Heavy imports after the arguments are known to be good.
    import torch

    from fed_dfkd.centralized import CentralDistillation
    from fed_dfkd.config import dump_config
    from fed_dfkd.data import load_experiment_data
    from fed_dfkd.data.teachers import load_teachers, pretrain_teachers
    from fed_dfkd.errors import UserError
    from fed_dfkd.evaluation import Evaluator, evaluate_round
    from fed_dfkd.progress import RoundProgress
    from fed_dfkd.reporting import build_report, record_level_privacy, write_plots
    from fed_dfkd.runs import RunDirectory
    from fed_dfkd.runtime import resolve_device, resume_key

    if cfg.privacy.level == "client":
        raise UserError("privacy.level client protects each owner's participation in a federation; "
                        "`fed-dfkd distill` has no clients: use `fed-dfkd simulate`, or level record")
    device = resolve_device(cfg.runtime)
    run_dir = RunDirectory(out)
    checkpoint = run_dir.load_checkpoint()
    if checkpoint is not None and not args.resume:
        raise UserError(
            f"{out} already holds a run ({checkpoint.get('round', '?')} rounds done); pass --resume "
            "to continue it, or choose another --out"
        )
    if args.resume and checkpoint is None:
        raise UserError(f"--resume: no checkpoint in {run_dir.checkpoint_path.parent}")
    if checkpoint is not None and "engine" not in checkpoint:
        raise UserError(f"--resume: {run_dir.checkpoint_path} is not the checkpoint of a "
                        "`fed-dfkd distill` run (was it written by `fed-dfkd simulate`?)")
    if checkpoint is not None and checkpoint.get("resume_key") != resume_key(cfg):
        raise UserError(
            f"--resume: the config differs from the one the run in {out} was started with "
            f"(see {run_dir.config_path}); only runtime.progress/threads/device may change"
        )
    run_dir.write_config(dump_config(cfg))

    splits = load_experiment_data(cfg)
    logger.info("data: %s (%d train / %d test)", splits.source, len(splits.train_labels),
                len(splits.test_labels))
    teacher_dir = Path(args.teachers) if args.teachers else out
    source = cfg.distill.teacher_source
    if not args.teachers:
        pretrain_teachers(cfg, teacher_dir, central=source == "central",
                          clients=source == "clients", splits=splits, device=device)
    loaded = load_teachers(teacher_dir, source=source, num_clients=cfg.federation.num_clients,
                           device=device)
    if args.teachers:
        _check_teachers_fit(cfg, splits.info, loaded, teacher_dir)
    teachers = [model for model, _ in loaded]
    privacy = record_level_privacy(cfg, [manifest for _, manifest in loaded])
    # Per-class counts: the "weighted" rule uses their sums, "class_weighted" the counts.
    weights = [[float(c) for c in manifest.class_histogram] for _, manifest in loaded]
    engine = CentralDistillation(cfg, teachers, splits.info, teacher_weights=weights, device=device)
    evaluator = Evaluator(
        splits.test_images, splits.test_labels, teachers, rule=cfg.distill.ensemble,
        weights=weights, batch_size=cfg.data.eval_batch_size,
    )
    logger.info("teachers: %s; ensemble %.4f", ", ".join(f"{a:.4f}" for a in evaluator.teacher_accuracies),
                evaluator.ensemble_accuracy)

    history: list[dict] = []
    wall_offset = 0.0
    if checkpoint is not None:
        engine.load_state_dict(checkpoint["engine"])
        history = list(checkpoint["history"])
        wall_offset = float(checkpoint["wall_seconds"])
        dropped = run_dir.metrics.truncate_after(engine.round)
        logger.info("resuming after round %d (%d uncommitted metric lines dropped)", engine.round, dropped)

    def report() -> dict:
        return build_report(
            cfg, history=history, wall_seconds=wall_offset + time.perf_counter() - started,
            teacher_accuracies=evaluator.teacher_accuracies,
            ensemble_accuracy=evaluator.ensemble_accuracy,
            class_names=splits.info.class_names, ensemble_per_class=evaluator.ensemble_per_class,
            extra={"engine": "central", "teacher_source": source, "data_source": splits.source,
                   "teachers_dir": str(teacher_dir.resolve()),
                   "device": str(device), **privacy},
        )

    def sample_labels(samples: torch.Tensor) -> list[str]:
        from fed_dfkd.samples import as_float_images

        with torch.no_grad():
            predicted = engine.teacher_targets(as_float_images(samples).to(device)).argmax(1)
        return [splits.info.class_names[int(k)] for k in predicted]

    started = time.perf_counter()
    total = cfg.federation.rounds
    with RoundProgress(total, mode=cfg.runtime.progress, desc="distill", initial=engine.round) as bar:
        while not engine.finished:
            metrics = engine.run_round()
            r = metrics["round"]
            if r % cfg.distill.eval_every == 0 or r == total:
                metrics.update(evaluate_round(evaluator, engine.coordinator))
            metrics["step"] = r
            metrics["wall_seconds"] = wall_offset + time.perf_counter() - started
            if privacy["epsilon"] is not None:
                metrics.update(epsilon=privacy["epsilon"], delta=privacy["delta"])
            history.append(metrics)
            # metrics line first, then the checkpoint: a crash in between leaves an extra line
            # that --resume drops, never a lost round.
            run_dir.metrics.append(metrics)
            run_dir.save_checkpoint({
                "engine": engine.state_dict(), "round": engine.round, "history": history,
                "wall_seconds": metrics["wall_seconds"], "resume_key": resume_key(cfg),
            })
            run_dir.write_report(report())
            bar.update(r, {k: metrics[k] for k in ("student_accuracy", "student_loss", "mean_weight",
                                                    "seconds") if k in metrics})
    final = report()
    run_dir.write_report(final)
    samples = engine.last_samples[:64] if engine.last_samples is not None else None
    write_plots(run_dir.plots_dir, history, teacher_accuracy=final["best_teacher_accuracy"],
                ensemble_accuracy=final["ensemble_accuracy"], samples=samples,
                sample_labels=sample_labels(samples) if samples is not None else None,
                per_class=final["per_class_accuracy"])
    print(
        f"student accuracy {final['student_accuracy']:.4f} "
        f"(teacher {final['best_teacher_accuracy']:.4f}, ensemble {final['ensemble_accuracy']:.4f}, "
        f"ratio {final['student_to_teacher']:.3f}) after {final['rounds_completed']} rounds, "
        f"{final['wall_seconds']:.1f} s; outputs in {out}"
    )
    return 0
