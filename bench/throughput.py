"""Generator and student steps per second for a teacher/student pair (the CPU baseline).

    python bench/throughput.py --pair lenet --batch-size 256 --steps 20
    python bench/throughput.py --pair resnet --batch-size 256 --steps 2
    python bench/throughput.py --pair digits --batch-size 128 --steps 50 --memory-format channels_last

A generator step is one AdaDFKD generator update (G forward, teacher forward/backward with BN
hooks, student forward/backward, R2M); a student step is one self-paced KD update on a
pseudo-batch. Random (untrained) teachers: the cost does not depend on the weights. One warm-up
step of each kind is not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from fed_dfkd.config import config_from_dict
from fed_dfkd.coordinator import build_pseudo_generator, build_student
from fed_dfkd.data import dataset_info
from fed_dfkd.distill import StudentTrainer
from fed_dfkd.models import MEMORY_FORMATS, build_classifier
from fed_dfkd.models.normalized import NormalizedClassifier, freeze
from fed_dfkd.runtime import resolve_device
from fed_dfkd.seeding import make_rng
from fed_dfkd.synthesis import Progress, build_generator_optimizer, build_synthesizer

PAIRS = {
    "lenet": {"data": {"dataset": "fashion_mnist"},
              "models": {"teacher": "lenet5_bn", "student": "lenet5_half",
                         "generator": {"latent_dim": 64, "width": 16, "depth": 2}}},
    "digits": {"data": {"dataset": "digits"},
               "models": {"teacher": "cnn_digits_bn", "student": "cnn_digits_half",
                          "generator": {"latent_dim": 32, "width": 16, "depth": 2}}},
    "resnet": {"data": {"dataset": "cifar10"},
               "models": {"teacher": "resnet34", "student": "resnet18",
                          "generator": {"latent_dim": 512, "width": 64, "depth": 2}}},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-format", choices=sorted(MEMORY_FORMATS), default="contiguous",
                        help="runtime.memory_format of the teacher and the student")
    args = parser.parse_args()
    raw = {**PAIRS[args.pair], "runtime": {"threads": args.threads, "device": args.device,
                                           "memory_format": args.memory_format},
           "method": {"name": "adadfkd", "generator_steps": 1,
                                           "negative_bank_size": 4 * args.batch_size},
           "distill": {"batch_size": args.batch_size}}
    cfg = config_from_dict(raw)
    device = resolve_device(cfg.runtime)
    info = dataset_info(cfg.data.dataset)
    teacher = freeze(NormalizedClassifier(
        build_classifier(cfg.models.teacher, num_classes=info.num_classes, in_channels=info.in_channels,
                         image_size=info.image_size), info.mean, info.std).to(device))
    student = build_student(cfg, info).to(device)
    generator = build_pseudo_generator(cfg, info).to(device)
    optimizer = build_generator_optimizer(generator, cfg.method)
    synthesizer = build_synthesizer(cfg.method, cfg.curriculum, batch_size=args.batch_size,
                                    teacher_feature_dim=teacher.feature_dim,
                                    student_feature_dim=student.feature_dim, seed=0)
    trainer = StudentTrainer(student, cfg.distill, cfg.curriculum, cfg.method)
    rng = make_rng(0, "bench", device=device)
    progress = Progress(0.5)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def generator_step() -> None:
        synthesizer.step(teacher=teacher, student=student, generator=generator, optimizer=optimizer,
                         progress=progress, rng=rng)

    images = torch.rand(args.batch_size, info.in_channels, info.image_size, info.image_size, device=device)
    with torch.no_grad():
        targets = teacher(images)

    def student_step() -> None:
        trainer.step(images, targets, progress)

    results = {}
    for name, step in (("generator", generator_step), ("student", student_step)):
        step()
        sync()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds = time.perf_counter() - started
        results[f"{name}_steps_per_second"] = args.steps / seconds
    record = {
        "pair": f"{cfg.models.teacher} -> {cfg.models.student}", "batch_size": args.batch_size,
        "steps": args.steps, "threads": torch.get_num_threads(), "device": str(device),
        "memory_format": args.memory_format,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        **{k: round(v, 3) for k, v in results.items()},
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
