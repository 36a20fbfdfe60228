"""Loopback deployment: Flower's SuperLink and SuperNodes as processes this module owns.

What ``fed-dfkd certs``, ``superlink``, ``supernode`` and ``deploy-local`` run (issue 3 item 5;
the verified Flower 1.41 facts are in platform.md §2, §3.1, §3.2 and §5):

- **Certificates** (:func:`make_certificates`): a CA and a server certificate for
  ``127.0.0.1``/``localhost`` made with the ``cryptography`` package (no openssl binary needed):
  ``ca.pem``, ``server.pem`` and ``server.key`` (mode 0600). The CA's key is never written, so
  nobody can issue more certificates under that CA.
- **Commands** (:func:`superlink_command`, :func:`supernode_command`): TLS unless told
  ``insecure``; the SuperLink never installs app dependencies at run time; every SuperNode gets
  its ``--node-config`` (partition id, teacher location) and its own Runtime API port.
- **Processes** (:class:`ProcessSupervisor`): each process starts in a new session, so its
  process group holds it and the children Flower spawns without detaching; it is stopped by
  signalling that group (SIGTERM, a bounded wait, then SIGKILL). Processes Flower detaches on
  purpose (the SuperLink's ``flower-superexec`` runs in a session of its own) are found by a
  marker variable every started process inherits (:data:`MARKER_VARIABLE`), so only processes
  this supervisor started, directly or not, are ever signalled.
- **deploy-local** (:func:`deploy_local`): pretrain the owners' missing teachers, make
  certificates, start one SuperLink and N SuperNodes on 127.0.0.1, submit the run with
  ``flwr run <app> <connection> --run-config <file> --stream``, wait for it (bounded), stop
  SuperNodes first and the SuperLink last, also on failure or interruption. The ServerApp writes
  the report into the run folder, with ``engine: "deployment"``.

Run-folder layout of ``deploy-local --out DIR``: the run's outputs (``report.json``,
``metrics.jsonl``, ...), ``teachers/`` (one teacher per owner), ``certs/``, ``logs/`` (one log per
process: ``superlink.log``, ``supernode-K.log``, ``flwr-run.log``; ``run_config.toml``; and
``processes.json``, every process started with its pid and port and the marker) and ``.flwr/``
(each process's ``FLWR_HOME``: installed FABs, the CLI's ``config.toml``).

The ServerApp gets ``out`` as an absolute path (the run config's ``out`` has no default: an empty
one is refused by the ServerApp) and no ``teachers``: in a deployment the teachers stay with the
SuperNodes, which find theirs through ``--node-config teachers-dir=... partition-id=K``.

Latency (platform.md §5): a round costs seconds of polling and process start in deployment; the
SuperNodes get ``OMP_NUM_THREADS=1`` and ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1``. A SIGKILLed
SuperNode is noticed by the SuperLink after about 61 s (2 missed 30 s heartbeats), or earlier by
the ServerApp's ``federation.round_timeout``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from fed_dfkd.engine.ray import flower_environment
from fed_dfkd.errors import UserError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CA_FILE = "ca.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
#: The connection ``deploy-local`` writes into the CLI's ``config.toml``.
CONNECTION_NAME = "fed-dfkd-local"
#: Every process a :class:`ProcessSupervisor` starts inherits ``MARKER_VARIABLE=<its marker>``.
MARKER_VARIABLE = "FED_DFKD_DEPLOYMENT_ID"
#: Latency tuning of the SuperNodes (platform.md §5): one torch thread per ClientApp process on
#: small machines, and SuperExec polling for new messages every 0.1 s instead of 1 s.
SUPERNODE_TUNING = {"OMP_NUM_THREADS": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
#: Seconds a process gets to exit after SIGTERM before SIGKILL.
STOP_GRACE = 10.0
#: Seconds to wait for the SuperLink's ``/health``.
HEALTH_TIMEOUT = 60.0
#: A SuperNode that cannot reach the SuperLink gives up after this many seconds.
SUPERNODE_MAX_WAIT = 60.0
#: Seconds added to ``rounds x round_timeout`` to bound a deployed run (start, node wait, report).
RUN_TIMEOUT_MARGIN = 180.0
#: Seconds given to each ``flwr`` CLI call other than the run itself.
CLI_TIMEOUT = 60.0

LOG_DIR = "logs"
PROCESS_RECORD = "processes.json"
CERTS_DIR = "certs"
FLWR_HOME_DIR = ".flwr"


# --------------------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class CertificatePaths:
    """The CA certificate, and the server certificate and key signed by that CA."""

    ca: Path
    certificate: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> "CertificatePaths":
        folder = Path(folder).expanduser().resolve()
        return cls(folder / CA_FILE, folder / SERVER_CERT_FILE, folder / SERVER_KEY_FILE)

    def files(self) -> tuple[Path, Path, Path]:
        return (self.ca, self.certificate, self.key)

    def require(self, *, server: bool) -> "CertificatePaths":
        """``self`` if the files exist (only ``ca.pem`` unless ``server``), else a UserError."""
        needed = self.files() if server else (self.ca,)
        missing = [p for p in needed if not p.is_file()]
        if missing:
            raise UserError(
                f"missing TLS file(s) {', '.join(str(p) for p in missing)}; make them with "
                f"`fed-dfkd certs --out {self.ca.parent}`, or pass --insecure to run without TLS"
            )
        return self


def make_certificates(
    out_dir: Path,
    *,
    ip_addresses: Sequence[str] = (LOOPBACK,),
    dns_names: Sequence[str] = ("localhost",),
    valid_days: int = 365,
    overwrite: bool = False,
) -> CertificatePaths:
    """Write a CA (``ca.pem``) and a server certificate and key (``server.pem``, ``server.key``).

    The server certificate names ``ip_addresses`` and ``dns_names`` as subject alternative names,
    with ``basicConstraints CA:FALSE``, ``keyUsage digitalSignature, keyEncipherment`` and
    ``extendedKeyUsage serverAuth`` (platform.md §5). Keys are RSA 2048, as in the setup
    platform.md verified with Flower; the key file gets mode 0600 and the CA key is not kept.
    An existing file is a UserError unless ``overwrite``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if valid_days < 1:
        raise UserError(f"certificate validity must be at least 1 day, got {valid_days}")
    paths = CertificatePaths.in_folder(out_dir)
    existing = [p for p in paths.files() if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{', '.join(str(p) for p in existing)} already exist(s); "
                        "pass --force to replace them")
    try:
        addresses = [ipaddress.ip_address(a) for a in ip_addresses]
    except ValueError as error:
        raise UserError(f"not an IP address: {error}") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    # Backdated a little: a clock a few seconds behind must not see a not-yet-valid certificate.
    not_before = now - datetime.timedelta(minutes=5)
    try:
        not_after = now + datetime.timedelta(days=valid_days)
    except OverflowError:
        raise UserError(f"certificate validity of {valid_days} days ends after the year 9999; "
                        "give fewer days") from None
    folder = paths.ca.parent
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder; choose another folder for the "
                        "certificates")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the certificate folder {folder}: "
                        f"{error.strerror or error}") from None

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fed-dfkd loopback CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alt_names = [x509.IPAddress(a) for a in addresses] + [x509.DNSName(n) for n in dns_names]
    common_name = (list(dns_names) + list(ip_addresses) + ["fed-dfkd"])[0]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    _write_private(paths.key, server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths.certificate.write_bytes(server_cert.public_bytes(pem))
    paths.ca.write_bytes(ca_cert.public_bytes(pem))
    return paths


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file that is mode 0600 from its creation on (never world-readable)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600)  # the umask may have removed nothing, but never adds


# --------------------------------------------------------------------------------------------
# Commands and environments


def executable(name: str) -> str:
    """The path of one of Flower's commands: next to this Python first (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UserError(f"`{name}` not found next to {sys.executable} nor on PATH; "
                        "install flwr==1.41.0 in this environment")
    return found


def process_environment(flwr_home: Path, *, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus platform.md §2's Flower variables for ``flwr_home``.

    The interpreter's folder goes first on ``PATH``: the SuperLink and the SuperNodes start
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name.
    """
    env = dict(os.environ)
    env.update(flower_environment(Path(flwr_home)))
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep)
                                               if p and p != bin_dir]])
    env.update(extra or {})
    return env


def _toml_string(value: str) -> str:
    # A JSON string literal is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(str(value))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return _toml_string(str(value))


def format_node_config(values: Mapping[str, Any]) -> str:
    """``--node-config`` text: space-separated ``key=value`` pairs, strings in double quotes.

    Flower splits the text with a regular expression that ends a quoted value at the next double
    quote, so a string value may not contain one (nor whitespace when unquoted, which never
    happens here).
    """
    parts = []
    for key, value in values.items():
        if isinstance(value, str) and '"' in value:
            raise UserError(f"node config {key}: a value may not contain a double quote: {value!r}")
        parts.append(f"{key}={_toml_value(value)}")
    return " ".join(parts)


def superlink_command(
    *, host: str = LOOPBACK, port: int, certificates: CertificatePaths | None,
    database: Path | None = None, log_file: Path | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS (``certificates``) or ``--insecure`` (``None``).

    Runtime dependency installation is always off (platform.md §3.2); ``database`` keeps the
    SuperLink's state in a file (in memory otherwise).
    """
    command = [executable("flower-superlink"), "--host", host, "--port", str(int(port)),
               "--disable-runtime-dependency-installation"]
    if certificates is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certificates.ca),
                    "--ssl-certfile", str(certificates.certificate),
                    "--ssl-keyfile", str(certificates.key)]
    if database is not None:
        command += ["--database", str(database)]
    if log_file is not None:
        command += ["--log-file", str(log_file)]
    return command


def supernode_command(
    *, superlink: str, port: int, node_config: Mapping[str, Any],
    root_certificates: Path | None, host: str = LOOPBACK, max_wait_time: float | None = None,
) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` (``HOST:PORT``), its Runtime API on
    ``host:port`` (one port per SuperNode on a machine), TLS verified against
    ``root_certificates`` or ``--insecure`` (``None``)."""
    command = [executable("flower-supernode"), "--superlink", superlink,
               "--host", host, "--port", str(int(port)),
               "--node-config", format_node_config(node_config)]
    if root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_certificates)]
    if max_wait_time is not None:
        command += ["--max-wait-time", f"{max_wait_time:g}"]
    return command


def connection_toml(*, name: str, address: str, root_certificates: Path | None) -> str:
    """A Flower CLI ``config.toml`` whose default connection is ``name`` (platform.md §3.1)."""
    lines = ["[superlink]", f"default = {_toml_string(name)}", "",
             f"[superlink.{name}]", f"address = {_toml_string(address)}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_string(str(Path(root_certificates).resolve()))}")
    return "\n".join(lines) + "\n"


def run_config_toml(run_config: Mapping[str, Any]) -> str:
    """A TOML file for ``flwr run --run-config FILE`` (no quoting rules of the inline form)."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in run_config.items())


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a TCP server could bind ``host:port`` now (no process listens there).

    ``SO_REUSEADDR``, as servers set it: connections of a stopped server lingering in TIME_WAIT
    do not make its port busy.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def health_url(*, host: str, port: int, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://{host}:{int(port)}/health"


def check_health(url: str, *, ca: Path | None = None, timeout: float = 2.0) -> bool:
    """Whether ``GET url`` answers 200 (HTTPS verified against ``ca``)."""
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


# --------------------------------------------------------------------------------------------
# Processes


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    # The state follows the parenthesised command name, which may itself hold ") ".
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X")


def processes_with_marker(marker: str) -> list[int]:
    """Running processes whose environment holds ``MARKER_VARIABLE=marker`` (Linux /proc)."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


@dataclass
class ManagedProcess:
    """A process started by a :class:`ProcessSupervisor` (leader of its own process group)."""

    name: str
    role: str
    command: list[str]
    popen: subprocess.Popen
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def _signal_group(process: ManagedProcess, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


class ProcessSupervisor:
    """Starts processes in their own sessions and stops every one of them, bounded in time.

    ``stop_all`` stops in waves by role (``ROLE_ORDER``: the CLI, then SuperNodes, then the
    SuperLink), each wave SIGTERM to every process group, a wait of at most ``grace`` seconds,
    then SIGKILL; last, any process still carrying this supervisor's marker (a child Flower
    detached into a session of its own) gets the same treatment. Every process id seen is kept
    in :attr:`seen_pids`, so a caller can check that none is left.
    """

    ROLE_ORDER = ("cli", "supernode", "superlink")

    def __init__(self, *, marker: str | None = None, grace: float = STOP_GRACE) -> None:
        self.marker = marker or uuid.uuid4().hex
        self.grace = grace
        self.processes: list[ManagedProcess] = []
        self.seen_pids: set[int] = set()
        self._lock = threading.Lock()

    def start(
        self, name: str, command: Sequence[str], *, role: str, env: Mapping[str, str],
        log_path: Path | None = None, cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start ``command`` in a new session, stdout and stderr into ``log_path``."""
        env = {**env, MARKER_VARIABLE: self.marker}
        log_file = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "ab")  # noqa: SIM115 - closed below, the child keeps its copy
        try:
            popen = subprocess.Popen(
                list(command), env=env, cwd=str(cwd) if cwd is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log_file if log_file is not None else None,
                stderr=subprocess.STDOUT if log_file is not None else None,
                start_new_session=True,
            )
        except OSError as error:
            raise UserError(f"cannot start {name} ({command[0]}): {error.strerror}") from None
        finally:
            if log_file is not None:
                log_file.close()
        process = ManagedProcess(name=name, role=role, command=list(command), popen=popen,
                                 log_path=log_path)
        with self._lock:
            self.processes.append(process)
            self.seen_pids.add(popen.pid)
        logger.info("started %s (pid %d)%s", name, popen.pid,
                    f", log {log_path}" if log_path is not None else "")
        return process

    def kill(self, process: ManagedProcess) -> None:
        """SIGKILL ``process``'s whole group at once (a crash, for dropout tests)."""
        self._remember_descendants()
        _signal_group(process, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(timeout=self.grace)

    def stop(self, processes: Sequence[ManagedProcess]) -> None:
        """SIGTERM the groups of ``processes``, wait at most ``grace`` s, SIGKILL what is left."""
        self._remember_descendants()
        for process in processes:
            if process.running():
                logger.info("stopping %s (pid %d)", process.name, process.pid)
            # The group may outlive its leader: signal it either way.
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        # The leader is gone; its children (a ClientApp mid-round) may take a moment more.
        while time.monotonic() < deadline and any(_group_alive(p.pid) for p in processes):
            time.sleep(0.1)
        for process in processes:
            if process.running() or _group_alive(process.pid):
                logger.warning("%s (pid %d) did not stop within %g s: SIGKILL", process.name,
                               process.pid, self.grace)
                _signal_group(process, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(timeout=5.0)

    def stop_all(self) -> None:
        """Stop every process started here, in ``ROLE_ORDER`` waves, then the marked leftovers."""
        with self._lock:
            processes = list(self.processes)
        roles = list(self.ROLE_ORDER) + sorted({p.role for p in processes} - set(self.ROLE_ORDER))
        for role in roles:
            wave = [p for p in reversed(processes) if p.role == role]
            if wave:
                self.stop(wave)
        self.sweep()

    def sweep(self) -> list[int]:
        """Stop processes that still carry this supervisor's marker; returns their ids."""
        leftovers = processes_with_marker(self.marker)
        if not leftovers:
            return []
        self.seen_pids.update(leftovers)
        logger.info("stopping %d detached process(es) started by this deployment: %s",
                    len(leftovers), ", ".join(map(str, leftovers)))
        for sig, wait in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)):
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(process_alive(p) for p in leftovers):
                time.sleep(0.1)
            leftovers = [p for p in leftovers if process_alive(p)]
            if not leftovers:
                break
        return leftovers

    def alive_pids(self) -> list[int]:
        """Ids among :attr:`seen_pids` (and marked processes) still running."""
        self.seen_pids.update(processes_with_marker(self.marker))
        return sorted(p for p in self.seen_pids if process_alive(p))

    def _remember_descendants(self) -> None:
        """Record the marked processes now, before stopping reparents them."""
        self.seen_pids.update(processes_with_marker(self.marker))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg: look for a live member.
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while cleaning up (a second Ctrl-C must not orphan processes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_foreground(
    command: Sequence[str], *, env: Mapping[str, str], grace: float = STOP_GRACE
) -> int:
    """Run ``command`` until it exits, forwarding SIGINT, SIGTERM and SIGHUP to its group.

    After a forwarded signal the child gets ``grace`` seconds, then its group is SIGKILLed, and
    marked processes it left (a detached ``flower-superexec``) are stopped. Returns the child's
    exit code (128 + signal number when a signal ended it).
    """
    supervisor = ProcessSupervisor(grace=grace)
    process = supervisor.start(Path(command[0]).name, command, role="foreground", env=env)
    first_signal_at: list[float] = []

    def forward(signum: int, _frame: Any) -> None:
        if not first_signal_at:
            first_signal_at.append(time.monotonic())
        _signal_group(process, signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        while process.running():
            if first_signal_at and time.monotonic() - first_signal_at[0] > grace:
                logger.warning("%s did not exit %g s after the signal: SIGKILL", command[0], grace)
                _signal_group(process, signal.SIGKILL)
                process.popen.wait(timeout=5.0)
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=0.2)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        with deferred_signals():
            supervisor.stop_all()
    code = process.popen.returncode
    return 128 - code if code is not None and code < 0 else int(code or 0)


# --------------------------------------------------------------------------------------------
# deploy-local


@dataclass
class RunOutcome:
    """How ``flwr run`` ended: the run id, Flower's status text, whether we gave up waiting."""

    run_id: int | None
    status: str | None
    timed_out: bool = False
    cli_exit_code: int | None = None

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed" and not self.timed_out


@dataclass
class DeploymentResult:
    """What :func:`deploy_local` returns: the run's outcome, its report (if written), the logs."""

    outcome: RunOutcome
    report: dict[str, Any] | None
    logs_dir: Path
    marker: str = ""
    seen_pids: set[int] = field(default_factory=set)
    ports: list[int] = field(default_factory=list)


class LocalDeployment:
    """One SuperLink and its SuperNodes on 127.0.0.1, owned by this object.

    Use it as a context manager: leaving the block (normally, on an exception or on Ctrl-C)
    stops every process it started (:meth:`ProcessSupervisor.stop_all`).
    """

    def __init__(self, out: Path, *, tls: bool = True, grace: float = STOP_GRACE) -> None:
        self.out = Path(out).resolve()
        self.tls = tls
        self.logs_dir = self.out / LOG_DIR
        self.flwr_home = self.out / FLWR_HOME_DIR
        self.supervisor = ProcessSupervisor(grace=grace)
        self.certificates: CertificatePaths | None = None
        self.superlink: ManagedProcess | None = None
        self.superlink_port: int | None = None
        self.supernodes: list[ManagedProcess] = []
        self.ports: list[int] = []
        self._records: list[dict[str, Any]] = []

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def superlink_address(self) -> str:
        if self.superlink_port is None:
            raise RuntimeError("the SuperLink is not started")
        return f"{LOOPBACK}:{self.superlink_port}"

    @property
    def record_path(self) -> Path:
        """``logs/processes.json``: every process started (name, role, pid, port, log) and the
        marker, rewritten at each start, so an operator can clean up by hand if this process
        itself is killed."""
        return self.logs_dir / PROCESS_RECORD

    def _record(self, process: ManagedProcess, *, port: int | None) -> None:
        self._records.append({"name": process.name, "role": process.role, "pid": process.pid,
                              "port": port, "log": str(process.log_path)})
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        self.record_path.write_text(json.dumps(
            {"marker": self.supervisor.marker, "marker_variable": MARKER_VARIABLE,
             "processes": self._records}, indent=2) + "\n")

    def _env(self, name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        # One FLWR_HOME per process: SuperNodes install the FAB concurrently.
        return process_environment(self.flwr_home / name, extra=extra)

    def make_certificates(self) -> CertificatePaths | None:
        """Fresh certificates in ``out/certs`` (TLS), or ``None`` (insecure)."""
        if self.tls:
            self.certificates = make_certificates(self.out / CERTS_DIR, overwrite=True)
        return self.certificates

    def start_superlink(
        self, *, port: int | None = None, health_timeout: float = HEALTH_TIMEOUT
    ) -> ManagedProcess:
        """Start the SuperLink and wait (bounded) until ``/health`` answers 200."""
        if self.tls and self.certificates is None:
            self.make_certificates()
        self.superlink_port = port or free_loopback_ports(1)[0]
        self.ports.append(self.superlink_port)
        command = superlink_command(port=self.superlink_port, certificates=self.certificates)
        self.superlink = self.supervisor.start(
            "superlink", command, role="superlink", env=self._env("superlink"),
            log_path=self.logs_dir / "superlink.log", cwd=self.out)
        self._record(self.superlink, port=self.superlink_port)
        url = health_url(host=LOOPBACK, port=self.superlink_port, tls=self.tls)
        ca = self.certificates.ca if self.certificates is not None else None
        deadline = time.monotonic() + health_timeout
        while not check_health(url, ca=ca):
            if not self.superlink.running():
                raise UserError(f"the SuperLink exited with code {self.superlink.popen.returncode} "
                                f"before it was ready; its log ({self.superlink.log_path}) ends "
                                f"with:\n{self.superlink.log_tail()}")
            if time.monotonic() >= deadline:
                raise UserError(f"the SuperLink did not answer {url} within {health_timeout:g} s; "
                                f"see {self.superlink.log_path}")
            time.sleep(0.25)
        logger.info("SuperLink ready on %s (%s)", self.superlink_address,
                    "TLS" if self.tls else "insecure")
        return self.superlink

    def start_supernode(
        self, partition_id: int, *, node_config: Mapping[str, Any], port: int | None = None,
    ) -> ManagedProcess:
        """Start one SuperNode with ``node_config`` (``partition-id`` is added)."""
        runtime_port = port or free_loopback_ports(1)[0]
        self.ports.append(runtime_port)
        command = supernode_command(
            superlink=self.superlink_address, port=runtime_port,
            node_config={"partition-id": int(partition_id), **dict(node_config)},
            root_certificates=self.certificates.ca if self.certificates is not None else None,
            max_wait_time=SUPERNODE_MAX_WAIT)
        node = self.supervisor.start(
            f"supernode-{partition_id}", command, role="supernode",
            env=self._env(f"supernode-{partition_id}", SUPERNODE_TUNING),
            log_path=self.logs_dir / f"supernode-{partition_id}.log", cwd=self.out)
        self._record(node, port=runtime_port)
        self.supernodes.append(node)
        return node

    def write_connection(self) -> Path:
        """The CLI's ``config.toml`` with this SuperLink as the default connection."""
        path = self.flwr_home / "cli" / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(connection_toml(
            name=CONNECTION_NAME, address=self.superlink_address,
            root_certificates=self.certificates.ca if self.certificates is not None else None))
        return path

    def _cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        """One short ``flwr`` call (ls, stop) on this deployment's connection."""
        return subprocess.run([executable("flwr"), *args], env=self._env("cli"), cwd=self.out,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def submit(self, app_dir: Path, run_config: Mapping[str, Any]) -> ManagedProcess:
        """Start ``flwr run app_dir <connection> --run-config FILE --stream`` (logs to a file)."""
        self.write_connection()
        config_file = self.logs_dir / "run_config.toml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(run_config_toml(run_config))
        command = [executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION_NAME,
                   "--run-config", str(config_file), "--stream"]
        submitted = self.supervisor.start("flwr-run", command, role="cli", env=self._env("cli"),
                                          log_path=self.logs_dir / "flwr-run.log", cwd=self.out)
        self._record(submitted, port=None)
        return submitted

    def run_id(self, submitted: ManagedProcess) -> int | None:
        """The run id ``flwr run`` printed, if it did."""
        match = re.search(r"Successfully started run (\d+)", submitted.log_tail(10_000))
        return int(match.group(1)) if match else None

    def run_status(self, run_id: int) -> str | None:
        """Flower's status text of ``run_id`` (``finished:completed``, ``running``, ...)."""
        try:
            result = self._cli("ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json")
        except subprocess.TimeoutExpired:
            return None
        start = result.stdout.find("{")
        try:
            runs = json.loads(result.stdout[start:])["runs"] if start >= 0 else []
        except (ValueError, KeyError, TypeError):
            logger.warning("cannot read `flwr ls` output: %s", (result.stdout + result.stderr)[-500:])
            return None
        return str(runs[0].get("status")) if runs else None

    def wait(self, submitted: ManagedProcess, *, timeout: float) -> RunOutcome:
        """Wait until ``flwr run --stream`` ends (the run ended) or ``timeout``; then stop the run
        if it is still going. The SuperLink dying ends the wait at once."""
        deadline = time.monotonic() + timeout
        while submitted.running() and time.monotonic() < deadline:
            if self.superlink is not None and not self.superlink.running():
                logger.error("the SuperLink exited (code %s) during the run",
                             self.superlink.popen.returncode)
                break
            time.sleep(0.5)
        timed_out = submitted.running() and time.monotonic() >= deadline
        run_id = self.run_id(submitted)
        if submitted.running():
            if timed_out:
                logger.error("the run did not finish within %g s: stopping it", timeout)
            if run_id is not None and self.superlink is not None and self.superlink.running():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._cli("stop", str(run_id), CONNECTION_NAME)
            self.supervisor.stop([submitted])
        status = None
        if run_id is not None and self.superlink is not None and self.superlink.running():
            status = self.run_status(run_id)
            # A log stream can end before the run does (a dropped connection): keep asking.
            while (not timed_out and status is not None and not status.startswith("finished")
                   and time.monotonic() < deadline and self.superlink.running()):
                time.sleep(2.0)
                status = self.run_status(run_id)
        return RunOutcome(run_id=run_id, status=status, timed_out=timed_out,
                          cli_exit_code=submitted.popen.returncode)

    def stop(self) -> None:
        """Stop everything started here: ``flwr``, SuperNodes, then the SuperLink (bounded)."""
        with deferred_signals():
            self.supervisor.stop_all()


def repository_root() -> Path:
    """The folder holding ``fed_dfkd/``, ``server/``, ``client/`` and the app's pyproject."""
    return Path(__file__).resolve().parents[2]


def check_app_dir(app_dir: Path) -> Path:
    """``app_dir`` if it holds a Flower app's ``pyproject.toml`` ([tool.flwr.app]), else a UserError."""
    app_dir = Path(app_dir).expanduser().resolve()
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise UserError(f"{app_dir} is not the fed-dfkd source folder (no pyproject.toml with "
                        "[tool.flwr.app]); `flwr run` builds the app from it: pass --app DIR")
    return app_dir


def deploy_local(
    *,
    config: Path,
    out: Path,
    overrides: Sequence[str] = (),
    num_clients: int | None = None,
    tls: bool = True,
    resume: bool = False,
    app_dir: Path | None = None,
    run_timeout: float | None = None,
    on_submitted: Callable[[LocalDeployment], None] | None = None,
) -> DeploymentResult:
    """Run the federation on a loopback deployment and stop every process it started.

    ``num_clients`` (default: ``federation.num_clients``) SuperNodes each host the teacher of
    their partition, pretrained into ``out/teachers`` when missing. The run waits at most
    ``run_timeout`` seconds (default: rounds x ``federation.round_timeout`` + one more timeout
    for the nodes to connect + :data:`RUN_TIMEOUT_MARGIN`). ``on_submitted`` is called once the
    run is submitted (tests use it to kill a SuperNode). Bad input is a UserError; a run that
    does not complete is reported in the result, not raised.
    """
    from fed_dfkd.config import load_config
    from fed_dfkd.data.teachers import pretrain_teachers
    from fed_dfkd.runtime import resolve_device
    from server.loop import ServerSettings, open_run

    out = Path(out).expanduser().resolve()
    app_dir = check_app_dir(app_dir or repository_root())
    overrides = list(overrides)
    if num_clients is not None:
        if num_clients < 1:
            raise UserError(f"--clients must be >= 1, got {num_clients}")
        overrides.append(f"federation.num_clients={num_clients}")
    config = Path(config).expanduser().resolve()
    cfg = load_config(config, overrides)
    clients = cfg.federation.num_clients
    # Refuse a wrong --resume (or an existing run) before spending time on teachers.
    open_run(out, cfg, resume=resume)
    pretrain_teachers(cfg, out, central=False, clients=True, device=resolve_device(cfg.runtime))
    settings = ServerSettings(config=config, out=out, overrides=tuple(overrides), teachers=None,
                              resume=resume, engine="deployment")
    run_config = settings.to_run_config()
    if run_timeout is None:
        remaining = cfg.federation.rounds
        run_timeout = (remaining + 1) * cfg.federation.round_timeout + RUN_TIMEOUT_MARGIN

    deployment = LocalDeployment(out, tls=tls)
    with deployment:
        # All ports at once, so no two processes are handed the same one.
        superlink_port, *node_ports = free_loopback_ports(clients + 1)
        deployment.start_superlink(port=superlink_port)
        for k in range(clients):
            deployment.start_supernode(
                k, node_config={"teachers-dir": str(out), "owner-dir": str(Path(out).resolve() / "owners")},
                port=node_ports[k])
        submitted = deployment.submit(app_dir, run_config)
        if on_submitted is not None:
            on_submitted(deployment)
        outcome = deployment.wait(submitted, timeout=run_timeout)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return DeploymentResult(outcome=outcome, report=report, logs_dir=deployment.logs_dir,
                            marker=deployment.supervisor.marker,
                            seen_pids=set(deployment.supervisor.seen_pids),
                            ports=list(deployment.ports))


__all__ = [
    "CA_FILE", "CONNECTION_NAME", "CertificatePaths", "DeploymentResult", "LocalDeployment",
    "MARKER_VARIABLE", "ManagedProcess", "ProcessSupervisor", "RunOutcome", "SERVER_CERT_FILE",
    "SERVER_KEY_FILE", "SUPERNODE_TUNING", "check_app_dir", "check_health", "connection_toml",
    "deferred_signals", "deploy_local", "executable", "format_node_config",
    "free_loopback_ports", "health_url", "make_certificates", "port_is_free", "process_alive",
    "process_environment", "processes_with_marker", "repository_root", "run_config_toml",
    "run_foreground", "superlink_command", "supernode_command",
]
