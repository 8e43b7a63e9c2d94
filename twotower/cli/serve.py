"""``twotower serve bundle_root=DIR bundle=NAME [port=8000 workers=2 ...]``: serve a
bundle over HTTP.

Settings are ``key=value`` words (see :class:`ServeSettings`); the bundle is loaded and
checked before any worker starts, so a bad bundle fails here with the reason. Needs only
the base install (no torch).

Access control: bearer tokens with scopes from ``TWOTOWER_API_TOKENS`` or
``tokens_file=PATH`` (``TOKEN:SCOPE[+SCOPE]`` entries; scopes read, write, admin).
Serving without them takes an explicit ``auth=none`` and binds to loopback only.
Reloads load bundles by name under ``bundle_root`` only.

Durability: events, item upserts and removals and bundle switches are written to a
SQLite file in ``state_dir`` before the server answers, and replayed on restart (see
:mod:`retrieval.server.state`). One server at a time may use a state directory.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ServeSettings:
    """What ``twotower serve`` takes, as ``key=value``."""

    # a bundle name under bundle_root; without bundle_root, a bundle directory whose
    # parent becomes the root (outputs/latest: reloads may load outputs/NAME)
    bundle: str = "outputs/latest"
    bundle_root: str | None = None
    # tokens (TWOTOWER_API_TOKENS or tokens_file) | none (no access control; loopback only)
    auth: str = "tokens"
    tokens_file: str | None = None
    # accepted Host headers, comma-separated; None: the loopback names when bound to
    # loopback, any otherwise
    allowed_hosts: str | None = None
    # origins allowed cross-origin requests, comma-separated; None: no CORS
    cors_origins: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    device: str = "cpu"
    # compute threads per worker (onnxruntime, FAISS); None: all cores with one worker,
    # 1 with more
    threads: int | None = None
    log_level: str = "info"
    # where events and the item/bundle change log are kept, durably, for every worker
    # and across restarts; None: $XDG_STATE_HOME/twotower (~/.local/state/twotower)
    state_dir: str | None = None
    # the event store's cap in bytes (the oldest events are evicted beyond it)
    max_event_bytes: int = 256 * 2**20


def parse_settings(words: list[str]) -> ServeSettings:
    """``key=value`` words as :class:`ServeSettings`; a ``ValueError`` names a bad word."""
    fields = {f.name: f for f in dataclasses.fields(ServeSettings)}
    values: dict[str, Any] = {}
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{word!r}: expected key=value with a key among {sorted(fields)}")
        kind = str(fields[key].type)
        if raw.lower() in ("null", "none", "") and "None" in kind:
            values[key] = None
        elif kind.startswith("int"):
            try:
                values[key] = int(raw)
            except ValueError as exc:
                raise ValueError(f"{word!r}: {key} must be an integer") from exc
        else:
            values[key] = raw
    settings = ServeSettings(**values)
    if settings.workers < 1 or not 0 < settings.port < 65536:
        raise ValueError("workers must be >= 1 and port within 1..65535")
    if settings.max_event_bytes < 1:
        raise ValueError("max_event_bytes must be positive")
    if settings.auth not in ("tokens", "none"):
        raise ValueError(f"auth must be tokens or none, got {settings.auth!r}")
    if settings.auth == "none" and not is_loopback(settings.host):
        raise ValueError(
            f"auth=none serves without access control, so it binds to loopback only "
            f"(host={settings.host}); set tokens (TWOTOWER_API_TOKENS or tokens_file=) instead"
        )
    return settings


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or name."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bundle_location(settings: ServeSettings) -> tuple[Path, Path]:
    """(the bundle directory, the bundle root) the settings name; a bundle URL
    (``s3://...``) is fetched into the local cache first and served from there."""
    from retrieval.server.bundles import BundleRoot
    from twotower.storage import is_url

    if is_url(settings.bundle) and settings.bundle_root is None:
        from twotower.bundle.remote import fetch_bundle

        local = fetch_bundle(settings.bundle)
        return local, local.parent
    if settings.bundle_root is None:
        given = Path(settings.bundle).absolute()
        return given.resolve(), given.parent.resolve()
    root = BundleRoot(settings.bundle_root)
    return root.resolve(settings.bundle), root.root


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/twotower``, or ``~/.local/state/twotower``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "twotower"


def claim_state_dir(directory: Path) -> int:
    """Lock ``directory`` for this server (held until the process exits); a
    ``ValueError`` when another server holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory / "server.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
        os.close(descriptor)
        raise ValueError(
            f"state_dir {directory} is in use by another server (pid {holder}); give each "
            "server its own state_dir"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, str(os.getpid()).encode(), 0)
    return descriptor


def usage() -> str:
    defaults = ServeSettings()
    lines = ["usage: twotower serve [key=value ...]", "", (__doc__ or "").strip(), ""]
    lines.append("settings (default):")
    lines += [f"  {f.name}={getattr(defaults, f.name)}" for f in dataclasses.fields(defaults)]
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    """Parse ``argv``, check the bundle, and serve until stopped; the exit status."""
    if any(word in ("-h", "--help") for word in argv):
        print(usage())
        return 0
    try:
        settings = parse_settings(argv)
    except ValueError as exc:
        print(f"twotower serve: {exc}", file=sys.stderr)
        return 2
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from retrieval import Retriever
    from retrieval.server import tcp_listener
    from retrieval.server.auth import TokenTable
    from retrieval.server.store import StateStore, StoreUnavailableError
    from twotower.errors import TwoTowerError

    state_dir = Path(settings.state_dir or default_state_dir()).absolute()
    try:  # fail here, with the reason, before forking workers
        bundle, root = bundle_location(settings)
        served = Retriever.load(bundle, device=settings.device)
        if settings.auth == "tokens" and TokenTable.load(settings.tokens_file) is None:
            raise ValueError(
                "no API tokens: set TWOTOWER_API_TOKENS (e.g. 'TOKEN:read;TOKEN2:read+write') "
                "or tokens_file=PATH, or auth=none to serve on loopback without access control"
            )
        claim_state_dir(state_dir)  # the lock is held until this process exits
        store = StateStore(state_dir, served.encoders.history_length, settings.max_event_bytes)
        dropped = store.compact()
        with store.writing() as writer:  # this run starts from the bundle it was given
            writer.record_bundle(Path(served.path).resolve())
            writer.commit()
    except (TwoTowerError, ValueError, OSError, ImportError, StoreUnavailableError) as exc:
        print(f"twotower serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(
        f"twotower serve: state in {store.path} ({store.event_count()} events, "
        f"{len(store.since(0))} change-log rows kept, {dropped} superseded rows compacted)",
        file=sys.stderr,
    )
    del served, store
    allowed_hosts = settings.allowed_hosts
    if allowed_hosts is None and is_loopback(settings.host):
        allowed_hosts = ",".join((*LOOPBACK_NAMES, "[::1]"))
    os.environ["TWOTOWER_BUNDLE"] = str(bundle)
    os.environ["TWOTOWER_BUNDLE_ROOT"] = str(root)
    # the name as given (latest, not its version): a reload without a name resolves it
    os.environ["TWOTOWER_BUNDLE_NAME"] = (
        settings.bundle
        if settings.bundle_root is not None
        else bundle.name  # a fetched URL's cached copy
        if "://" in settings.bundle
        else Path(settings.bundle).name
    )
    os.environ["TWOTOWER_AUTH"] = settings.auth
    os.environ["TWOTOWER_TOKENS_FILE"] = (
        str(Path(settings.tokens_file).resolve()) if settings.tokens_file else ""
    )
    os.environ["TWOTOWER_ALLOWED_HOSTS"] = allowed_hosts or ""
    os.environ["TWOTOWER_CORS_ORIGINS"] = settings.cors_origins or ""
    os.environ["TWOTOWER_DEVICE"] = settings.device
    workers = settings.workers
    run_dir = Path(tempfile.mkdtemp(prefix="twotower-serve-"))
    for inherited in ("TWOTOWER_THREADS", "PROMETHEUS_MULTIPROC_DIR"):
        os.environ.pop(inherited, None)  # only these settings decide, not the shell's
    # events, item changes and reloads reach every worker, and the next run, through it
    os.environ["TWOTOWER_STATE_DIR"] = str(state_dir)
    os.environ["TWOTOWER_MAX_EVENT_BYTES"] = str(settings.max_event_bytes)
    if workers > 1:
        # /metrics sums every worker's series (prometheus-client's multiprocess mode)
        metrics_dir = run_dir / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # Several workers on few cores: one compute thread each, or their thread pools fight.
    threads = settings.threads if settings.threads is not None else (1 if workers > 1 else None)
    if threads is not None:
        os.environ["TWOTOWER_THREADS"] = str(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    config = uvicorn.Config(
        "retrieval.server.app:app_from_env",
        factory=True,
        host=settings.host.strip("[]"),  # [::1] as in a URL: the address is ::1
        port=settings.port,
        workers=workers,
        log_level=settings.log_level,
    )
    try:
        if workers == 1:
            uvicorn.Server(config).run()
        else:
            Multiprocess(config, sockets=[tcp_listener(settings.host, settings.port)]).run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0
