"""Shared test settings.

Torch defaults to one thread per core; with two test processes (or a test and a benchmark) on a
2-core machine that oversubscribes badly (15 epochs: 191 s at 2 threads vs 4 s at 1), so every
test runs single-threaded.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def student_batches(monkeypatch):
    """``student_batches(coordinator, samples, targets, relabel=None)``: the (images, targets)
    the coordinator's trainer receives for one round of :meth:`Coordinator.train_student`."""

    def run(coordinator, samples, targets, relabel=None):
        seen = []
        original = coordinator.trainer.train_round

        def recording(images, labels, progress):
            seen.append((images.clone(), labels.clone()))
            return original(images, labels, progress)

        monkeypatch.setattr(coordinator.trainer, "train_round", recording)
        coordinator.train_student(samples, targets, relabel=relabel)
        return seen[0]

    return run
