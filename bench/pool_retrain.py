"""Retrain a fresh student on the labelled pool a finished run left in its checkpoint.

The pool (``distill.replay_rounds`` with ``replay_sampling: samples``) holds every round's uint8
pseudo-samples and their ensemble targets. Training a new student on it, with the run's own
student settings unless changed here, separates what the student side does (temperature, steps,
sampling, filtering) from the synthesis, in minutes instead of a whole federation:

    python bench/pool_retrain.py --run runs/fed_po/a03_own --teachers runs/fmnist_probe/fed_a03/teachers \
        --temperature 1 --steps 2400

``--set distill.KEY=VALUE`` changes any other student setting (learning rate, batch size, ...).
Sharper targets for the fit: ``--set distill.final_fit_target_temperature=τ`` (on a run that
leaves that key null, ``--set distill.target_temperature=τ`` does the same; where it is set, it wins).
``--select agree`` keeps only the samples whose ensemble label is the class the owner's G was
asked for (a ``federation.generators: per_owner`` run in which every owner replied every round;
the classes are recomputed from each owner's manifest). ``--select balanced`` draws the
student's batches with weights inversely proportional to the count of their ensemble label.
``--select generated`` drops a run's query batches, its ``distill.hard_samples`` and
``distill.mixup_queries`` (the last (hard_samples + mixup_queries) / batch_size batches of every
round's entry but round 1's), keeping what the generators drew: the same run's pool without them. ``--relabel RULE`` replaces the pool's targets
by the ``--teachers`` folder's teachers' logits on the pool's images, combined by ``distill.ensemble``
rule RULE with their manifests' class histograms (any teachers: the pool's own, or another
federation's, to compare rules on fixed samples); with ``distill.relabel_augmented`` those teachers
also label the fit's augmented batches. ``--mixup-queries N`` (with ``--relabel``) appends N
blends of random pool pairs labelled once by those teachers: what ``distill.mixup_queries`` asks the
owners over a run, here all at once. One line per 10 chunks of
``student_steps``: the test accuracy. With the run's settings (no ``--temperature``, ``--select all``) and the
checkpoint of a run with ``distill.final_fit_steps``, it redoes that run's final fit on the same pool: the same
initialisation and the same draws, so the last line is the run's final student accuracy (the pool then already
holds the last round).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch

from fed_dfkd.aggregation import LOGIT_RULES, aggregate_logits
from fed_dfkd.augment import blend_pairs
from fed_dfkd.config import load_config
from fed_dfkd.coordinator import build_pseudo_generator, fit_fresh_student
from fed_dfkd.data import dataset_info
from fed_dfkd.data.datasets import load_experiment_data
from fed_dfkd.data.teachers import load_teacher, predict_logits
from fed_dfkd.distill import StudentTrainer
from fed_dfkd.errors import UserError
from fed_dfkd.metrics import accuracy
from fed_dfkd.samples import as_float_images, round_latents


def pool(run: Path, teachers: Path | None, select: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, targets) of the run's pool, filtered with ``select`` ``"agree"`` or
    ``"generated"``."""
    cfg = load_config(run / "config.resolved.yaml")
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    coordinator = state["server"]["coordinator"] if "server" in state else state["engine"]["coordinator"]
    images, targets = [], []
    owners = sorted(state["server"].get("owner_generators", {})) if "server" in state else []
    generator = build_pseudo_generator(cfg, dataset_info(cfg.data.dataset))
    manifests = {}
    query_rows = (cfg.distill.hard_samples + cfg.distill.mixup_queries) // cfg.distill.batch_size
    entries = coordinator["replay"]["entries"]
    first_round = int(coordinator["round"]) - len(entries)  # a bounded buffer drops early rounds
    for entry, (batch_images, batch_targets) in enumerate(entries):
        round_index = first_round + entry
        rows = batch_images.shape[0]
        if select == "generated" and round_index > 0:
            if not query_rows:
                raise SystemExit("--select generated needs a run with distill.hard_samples or mixup_queries")
            rows -= query_rows
        for row in range(rows):
            keep = torch.ones(batch_images.shape[1], dtype=torch.bool)
            if select == "agree":
                if round_index == 0 or teachers is None:
                    continue  # round 0 is the untrained G's batch; nobody was asked for a class
                if len(owners) != batch_images.shape[0]:
                    raise SystemExit(f"--select agree: round {round_index + 1}'s pool entry has "
                                     f"{batch_images.shape[0]} batches, not one per kept owner "
                                     f"({len(owners)}); it needs a per-owner run in which every "
                                     "owner replied every round")
                owner = owners[row]
                if owner not in manifests:
                    manifests[owner] = load_teacher(teachers / f"client_{owner}.pt")[1]
                manifest = manifests[owner]
                _, asked = round_latents(
                    generator, seed=cfg.runtime.seed, round_index=round_index,
                    batch_size=cfg.distill.batch_size, num_classes=manifest.num_classes, owner=owner,
                    class_counts=manifest.class_histogram if cfg.federation.owner_labels == "own" else None)
                keep = batch_targets[row].argmax(1) == asked
            images.append(batch_images[row][keep])
            targets.append(batch_targets[row][keep])
    return torch.cat(images), torch.cat(targets)


def relabeller(teachers: Path, num_clients: int, rule: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of images (uint8 or float in [0, 1]): the owners' teachers' logits on them,
    combined by ``rule`` with their class histograms."""
    loaded = [load_teacher(teachers / f"client_{owner}.pt") for owner in range(num_clients)]
    counts = [manifest.class_histogram for _, manifest in loaded]

    def label(images: torch.Tensor) -> torch.Tensor:
        logits = [predict_logits(model, as_float_images(images), batch_size=2048) for model, _ in loaded]
        return aggregate_logits(torch.stack(logits), rule=rule, weights=counts)

    return label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--teachers", type=Path, help="the owners' teachers folder (for --select agree and --relabel)")
    parser.add_argument("--select", choices=("all", "agree", "balanced", "generated"), default="all")
    parser.add_argument("--relabel", choices=LOGIT_RULES, help="label the pool again with the "
                        "--teachers folder's teachers, combined by this rule")
    parser.add_argument("--mixup-queries", type=int, default=0, metavar="N",
                        help="append N blends of random pool pairs (distill.mixup_queries' blends), "
                        "labelled once by the --relabel teachers")
    parser.add_argument("--mixup-query-alpha", type=float, default=1.0, metavar="A",
                        help="their blend weights: Beta(A, A) (default 1: uniform)")
    parser.add_argument("--steps", type=int, help="student steps in all (default: the run's "
                        "distill.final_fit_steps, else 2400)")
    parser.add_argument("--temperature", type=float, help="KD temperature (default: the run's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a student setting of the run's config (distill.lr=0.005, ...)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.temperature is not None:
        args.overrides.append(f"distill.temperature={args.temperature}")

    try:
        cfg = load_config(args.run / "config.resolved.yaml", args.overrides)
    except UserError as error:
        raise SystemExit(f"pool_retrain.py: {error}") from None
    if not (args.run / "checkpoints" / "last.pt").is_file():
        raise SystemExit(f"pool_retrain.py: {args.run} has no checkpoints/last.pt")
    d = cfg.distill
    steps = args.steps or d.final_fit_steps or 2400
    splits = load_experiment_data(cfg)
    images, targets = pool(args.run, args.teachers, args.select)
    label = None
    if d.feature_weight:
        raise SystemExit("pool_retrain.py: the run's student regresses its teacher's features "
                         "(distill.feature_weight), which this script does not load; add "
                         "--set distill.feature_weight=0 to fit on the logits alone")
    if d.relabel_augmented and args.relabel is None:
        raise SystemExit("pool_retrain.py: the run relabels its augmented batches "
                         "(distill.relabel_augmented): pass --teachers and --relabel RULE")
    if args.relabel is not None:
        if args.teachers is None:
            raise SystemExit("pool_retrain.py: --relabel needs --teachers")
        label = relabeller(args.teachers, cfg.federation.num_clients, args.relabel)
        targets = label(images)
        print(f"relabelled by {args.relabel}: mean top probability "
              f"{float(targets.softmax(1).max(1).values.mean()):.3f}", flush=True)
    if args.mixup_queries < 0 or args.mixup_query_alpha <= 0:
        raise SystemExit("pool_retrain.py: --mixup-queries must be >= 0 and --mixup-query-alpha > 0")
    if args.mixup_queries:
        if label is None:
            raise SystemExit("pool_retrain.py: --mixup-queries needs --relabel RULE (the teachers label the blends)")
        blends = blend_pairs(images, args.mixup_queries, alpha=args.mixup_query_alpha,
                             generator=torch.Generator().manual_seed(cfg.runtime.seed))
        images, targets = torch.cat([images, blends]), torch.cat([targets, label(blends).to(targets.dtype)])
    labels = targets.argmax(1)
    print(f"pool {len(images)} samples, ensemble labels per class "
          f"{torch.bincount(labels, minlength=splits.info.num_classes).tolist()}", flush=True)
    weights = None
    if args.select == "balanced":
        weights = (1.0 / torch.bincount(labels, minlength=splits.info.num_classes).clamp(min=1).float())[labels]

    test = splits.test_images

    def report(trainer: StudentTrainer, chunk: int, chunks: int) -> None:
        if (chunk + 1) % 10 == 0 or chunk + 1 == chunks:
            score = accuracy(predict_logits(trainer.evaluated, test, batch_size=cfg.data.eval_batch_size),
                             splits.test_labels)
            print(f"chunk {chunk + 1}/{chunks} ({min(steps, (chunk + 1) * d.student_steps)} steps): "
                  f"test accuracy {score:.4f}", flush=True)

    # The run's own final fit (Coordinator.final_fit) on the same pool: the same draws.
    fit_fresh_student(cfg, splits.info, images, targets, steps=steps, weights=weights, after_chunk=report,
                      relabel=label)


if __name__ == "__main__":
    main()
