"""``fed-dfkd supernode``: a Flower SuperNode hosting one owner's teacher, in the foreground.

The node config carries ``partition-id`` and the teacher's location: ``--teachers DIR`` (a
``fed-dfkd pretrain --out`` folder; the teacher of ``--partition-id`` is used) or
``--teacher-path FILE``. ``--port`` is this SuperNode's own Runtime API port for its ClientApp
processes (distinct per SuperNode on a machine). TLS by default: ``--certs DIR`` needs only the
CA's ``ca.pem``. Latency tuning of platform.md §5 (``OMP_NUM_THREADS=1``,
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1``) is set; ``FLWR_HOME`` is ``--state DIR/.flwr``, else
the environment's, else ``./.flwr``. Signals are forwarded as for ``fed-dfkd superlink``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fed_dfkd.cli.superlink import (
    add_tls_arguments,
    check_grace,
    check_port,
    flwr_home,
    require_tls_choice,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("supernode", help="run a Flower SuperNode hosting one teacher")
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT",
                        help="the SuperLink's address")
    parser.add_argument("--partition-id", type=int, required=True, metavar="K",
                        help="the owner's partition (names its teacher in --teachers)")
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teachers", metavar="DIR", help="a `fed-dfkd pretrain --out` folder")
    teacher.add_argument("--teacher-path", metavar="FILE", help="a teacher file (teachers/client_K.pt)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address of this node's Runtime API (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True,
                        help="this node's Runtime API port (one per SuperNode on a machine)")
    add_tls_arguments(parser)
    parser.add_argument("--device", default=None, help="torch device for the teacher (default: config)")
    parser.add_argument("--owner-dir", metavar="DIR", default=None,
                        help="folder of this owner's privacy ledger and run state (default: next "
                             "to the teacher file, so the budget spans every run it serves)")
    parser.add_argument("--max-wait-time", type=float, default=None, metavar="SECONDS",
                        help="give up after this long without reaching the SuperLink (default: never)")
    parser.add_argument("--state", metavar="DIR", default=None, help="Flower home under DIR/.flwr")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds to exit after a signal before SIGKILL (default 10)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fed_dfkd.data.teachers import load_teacher, teacher_path
    from fed_dfkd.engine.deploy import (
        SUPERNODE_TUNING,
        CertificatePaths,
        process_environment,
        run_foreground,
        supernode_command,
    )
    from fed_dfkd.errors import UserError

    require_tls_choice(args)
    if args.partition_id < 0:
        raise UserError(f"--partition-id must be >= 0, got {args.partition_id}")
    host, _, port = args.superlink.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"--superlink must be HOST:PORT with a port in 1..65535, "
                        f"got {args.superlink!r}")
    check_port("--port", args.port)
    check_grace(args.grace)
    if args.max_wait_time is not None and not args.max_wait_time > 0:
        raise UserError(f"--max-wait-time must be > 0 seconds, got {args.max_wait_time}")
    node_config: dict[str, object] = {"partition-id": args.partition_id}
    # Absolute paths: ClientApp processes do not run in this folder.
    if args.teachers:
        folder = Path(args.teachers).expanduser().resolve()
        path = teacher_path(folder, args.partition_id)
        if not path.is_file():
            raise UserError(f"--teachers {folder}: no teacher for partition {args.partition_id} "
                            f"({path})")
        node_config["teachers-dir"] = str(folder)
    else:
        path = Path(args.teacher_path).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"--teacher-path {path}: no such file")
        node_config["teacher-path"] = str(path)
    # Now, not when the first round reaches the ClientApp: a damaged file is a UserError naming it.
    load_teacher(path)
    if args.device:
        from fed_dfkd.runtime import checked_device

        checked_device(args.device, "--device")
        node_config["device"] = args.device
    if args.owner_dir:
        node_config["owner-dir"] = str(Path(args.owner_dir).expanduser().resolve())
    ca = None if args.insecure else CertificatePaths.in_folder(Path(args.certs)).require(server=False).ca
    command = supernode_command(superlink=args.superlink, port=args.port, host=args.host,
                                node_config=node_config, root_certificates=ca,
                                max_wait_time=args.max_wait_time)
    env = process_environment(flwr_home(args.state), extra=SUPERNODE_TUNING)
    return run_foreground(command, env=env, grace=args.grace)
