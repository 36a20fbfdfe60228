"""Shared test settings.

Torch defaults to one thread per core; with two test processes (or a test and a benchmark) on a
2-core machine that oversubscribes badly (15 epochs: 191 s at 2 threads vs 4 s at 1), so every
test runs single-threaded.
"""

import torch

torch.set_num_threads(1)
