"""Shared test settings.

Torch defaults to one thread per core; with two test processes (or a test and a benchmark) on a
2-core machine that oversubscribes badly (15 epochs: 191 s at 2 threads vs 4 s at 1), so every
test runs single-threaded.
"""

import pytest
import torch

from fed_dfkd.config import config_from_dict

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


@pytest.fixture
def pool_config():
    """``pool_config(**distill)``: a digits config with a small sample pool (batches of 8, two
    per round, five rounds kept, four rounds), ``distill`` settings on top."""

    def make(**distill):
        return config_from_dict({
            "data": {"dataset": "digits"},
            "models": {"teacher": "cnn_digits", "student": "cnn_digits"},
            "distill": {"batch_size": 8, "pseudo_batches": 2, "student_steps": 2, "replay_rounds": 5,
                        "replay_sampling": "samples", **distill},
            "federation": {"rounds": 4},
        })

    return make
