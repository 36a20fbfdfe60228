"""Wire audit (DESIGN.md §5): every message of a simulated run, recorded both ways, carries only
the allowed payloads: no teacher parameter, no real image, no unknown record, array or key.

The in-process grid's observer sees each instruction as a client receives it and each reply as
the server receives it. Every message must pass ``check_payload_keys`` with the generator's and
the student's state-dict names as the only model array names, every model array must have the
shape of the server's own tensor of that name (so no teacher tensor can travel under a borrowed
name), and replies hold no uint8 array and nothing shaped like an image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message

from fed_dfkd.cli.main import main
from fed_dfkd.config import load_config
from fed_dfkd.coordinator import build_pseudo_generator, build_student, float_state
from fed_dfkd.data import dataset_info
from fed_dfkd.data.teachers import load_teacher, teacher_path
from fed_dfkd.engine.inprocess import run_inprocess
from fed_dfkd.transport import check_payload_keys, keys
from server.loop import ServerSettings
from runhelpers import tiny

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
ROUNDS, CLIENTS = 2, 3
FAST = tiny(rounds=ROUNDS, clients=CLIENTS)


def arrays(message: Message) -> list[tuple[str, str, np.ndarray]]:
    """(record, array name, value) for every array the message carries."""
    return [(record_name, name, array.numpy())
            for record_name, record in message.content.items() if isinstance(record, ArrayRecord)
            for name, array in record.items()]


def test_every_message_of_a_simulated_run_carries_only_allowed_payloads(tmp_path):
    teachers = tmp_path / "pretrain"
    assert main(["pretrain", "--config", str(QUICKSTART), "--out", str(teachers),
                 *[a for o in FAST for a in ("--set", o)]]) == 0
    cfg = load_config(QUICKSTART, FAST)
    info = dataset_info(cfg.data.dataset)
    generator_shapes = {k: tuple(v.shape) for k, v in build_pseudo_generator(cfg, info).state_dict().items()}
    student_shapes = {k: tuple(v.shape) for k, v in build_student(cfg, info).state_dict().items()}
    update_shapes = {k: tuple(v.shape) for k, v in float_state(build_pseudo_generator(cfg, info)).items()}
    model_shapes = {keys.GENERATOR_RECORD: generator_shapes, keys.STUDENT_RECORD: student_shapes,
                    keys.GENERATOR_UPDATE_RECORD: update_shapes}
    model_names = {record: set(shapes) for record, shapes in model_shapes.items()}

    recorded: list[tuple[str, Message]] = []
    settings = ServerSettings(config=QUICKSTART, out=tmp_path / "run", overrides=tuple(FAST),
                              teachers=teachers, engine="inprocess")
    run_inprocess(settings.to_run_config(), num_nodes=CLIENTS,
                  observer=lambda direction, message: recorded.append((direction, message)))

    down = [m for d, m in recorded if d == "down"]
    up = [m for d, m in recorded if d == "up"]
    assert len(down) == len(up) == ROUNDS * CLIENTS
    assert all(not m.has_error() for m in up)

    for message in down:
        check_payload_keys(message.content, keys.ALLOWED_INSTRUCTION_KEYS, model_array_names=model_names)
    for message in up:
        check_payload_keys(message.content, keys.ALLOWED_REPLY_KEYS, model_array_names=model_names)

    batch = 2 * 32  # student_steps x batch_size pseudo-samples per round
    for direction, message in recorded:
        for record, name, value in arrays(message):
            if record in model_shapes:
                assert value.shape == model_shapes[record][name], (direction, record, name)
            elif record == keys.SAMPLES_RECORD:
                assert direction == "down" and value.dtype == np.uint8
                assert value.shape == (batch, info.in_channels, info.image_size, info.image_size)
            else:
                assert (record, name) == (keys.LOGITS_RECORD, keys.LOGITS_ARRAY), (record, name)
                assert value.shape == (batch, info.num_classes)
            if direction == "up":
                # No real (or any) image goes back: no uint8 array, nothing [N, C, H, W] but ΔG's
                # own tensors (pinned to G's shapes above).
                assert value.dtype != np.uint8, (record, name)
                assert value.ndim < 4 or record == keys.GENERATOR_UPDATE_RECORD, (record, name)

    # No teacher parameter: besides the names and shapes pinned above, no teacher tensor travels
    # bit for bit under any name.
    for k in range(CLIENTS):
        teacher, _ = load_teacher(teacher_path(teachers, k))
        for tensor in (v.detach().numpy() for v in teacher.state_dict().values() if v.numel() > 8):
            for direction, message in recorded:
                for record, name, value in arrays(message):
                    if tensor.shape == value.shape:
                        assert not np.array_equal(tensor, value), (k, direction, record, name)
