"""`vae`: serve a bundle, or train / export / evaluate a model (those need the train extra)."""

import argparse
import errno
import importlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from service.bundle import BundleError, read_manifest, select_providers
from service.runtime import available_cpus
from service.settings import Settings
from service.workers import run_workers

log = logging.getLogger("service.cli")

MODEL_COMMANDS = {
    "train": "train a VAE on images",
    "fit-prior": "fit a mixture-of-Gaussians prior to a trained model",
    "export": "export a checkpoint to a bundle (manifest.json + ONNX)",
    "evaluate": "evaluate a checkpoint or bundle on test data",
    "calibrate": "recalibrate a bundle's anomaly scores from its ONNX files",
}
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
# uvicorn's connection options, set on purpose (docs/DEPLOY.md): the httptools protocol with head
# size and read timeouts (service/connections.py); idle keep-alive connections closed after 5 s;
# past 1000 connections or requests in progress a 503, below the usual 1024 open-files limit at
# which accepting would fail instead
HTTP_PROTOCOL = "service.connections:GuardedHttpToolsProtocol"
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 1000
# Longest wait for in-flight requests on shutdown: Kubernetes' default grace period, past which
# the pod is killed anyway.
GRACEFUL_SHUTDOWN_S = 30
SERVE_ENV = {"bundle": "VAE_BUNDLE", "device": "VAE_DEVICE", "log_level": "VAE_LOG_LEVEL"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with each flag's default once: appended unless it is None (the help says why)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low` (and at most `high`), the flag named in
    argparse's message; `vae serve`'s and the model commands' numbers alike."""

    def integer(s: str) -> int:
        value = int(s)  # argparse says "invalid integer value" for what is no integer
        if high is None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return integer


def build_parser() -> argparse.ArgumentParser:
    """The `vae` argument parser; model commands pass their arguments through untouched."""
    parser = argparse.ArgumentParser(
        prog="vae",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a bundle over HTTP (settings also come from VAE_* variables)",
        formatter_class=HelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind")
    serve.add_argument("--port", type=int_in_range(0, 65535), default=8000, help="TCP port")
    serve.add_argument(
        "--bundle", help="bundle directory (default: $VAE_BUNDLE, else the shipped MNIST bundle)"
    )
    serve.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="default: $VAE_DEVICE or auto"
    )
    serve.add_argument(
        "--workers",
        type=int_in_range(0, 1024),
        default=1,
        help="server processes, each with its own socket (SO_REUSEPORT) so connections spread "
        "evenly; 0: one per usable core. POST /admin/reload and SIGHUP reload every worker",
    )
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="default: $VAE_LOG_LEVEL or info",
    )
    for name, help_text in MODEL_COMMANDS.items():
        commands.add_parser(name, help=f"{help_text} (needs: pip install 'vae-server[train]')")
    commands.add_parser(
        "score",
        help="score an image archive with Ray Data, as POST /elbo would "
        "(needs: pip install 'vae-server[batch]')",
    )
    return parser


def run_model_command(argv: list[str]) -> int:
    """Hand `train`/`export`/`evaluate` to model.cli, imported only now (it needs torch)."""
    try:
        model_cli = importlib.import_module("model.cli")
    except ImportError as exc:
        print(
            f"vae {argv[0]}: the training tools are not installed ({exc}); "
            "run: pip install 'vae-server[train]'",
            file=sys.stderr,
        )
        return 2
    result = model_cli.main(argv)
    return int(result or 0)


def _source(field: str, args: argparse.Namespace) -> str:
    """How the user set a serve setting: the flag when given, else its variable."""
    flag = f"--{field.replace('_', '-')}"
    env = f"VAE_{field.upper()}"
    return flag if field in SERVE_ENV and getattr(args, field) is not None else env


def settings_errors(exc: ValidationError, args: argparse.Namespace) -> str:
    """One line per invalid setting, named as the user set it (a flag or a VAE_* variable)."""
    lines = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        value = f"={error['input']!s}" if isinstance(error.get("input"), str | int) else ""
        lines.append(f"  {_source(field, args)}{value}: {error['msg']}")
    return "\n".join(lines)


def port_problem(host: str, port: int) -> str | None:
    """Why uvicorn could not listen on host:port, found by binding it first; None if it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except socket.gaierror:
            return f"--host {host} is not a valid address or name"
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is already in use (another server?); stop it or "
                    "choose another with --port"
                )
            if exc.errno == errno.EACCES:
                return f"no permission to listen on port {port}; choose one above 1023 (--port)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"--host {host} is not an address of this machine"
            return f"cannot listen on {host}:{port}: {exc.strerror} (--host, --port)"
    return None


def run_score(argv: list[str]) -> int:
    """Hand `score` to service.batch, imported only now (it needs Ray)."""
    try:
        batch = importlib.import_module("service.batch")
    except ImportError as exc:
        print(
            f"vae score: Ray Data is not installed ({exc}); run: pip install 'vae-server[batch]'",
            file=sys.stderr,
        )
        return 2
    return int(batch.main(argv))


def serve(args: argparse.Namespace) -> int:
    """Validate the configuration, then run uvicorn with the app factory."""
    import uvicorn

    for field, env in SERVE_ENV.items():
        value = getattr(args, field)
        if value is not None:
            os.environ[env] = str(value)  # workers build their settings from the environment
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"vae serve: invalid settings:\n{settings_errors(exc, args)}", file=sys.stderr)
        return 2
    for field, check in (("bundle", read_manifest), ("device", select_providers)):
        try:
            check(getattr(settings, field))
        except BundleError as exc:
            print(f"vae serve: {exc} (set by {_source(field, args)})", file=sys.stderr)
            return 2
    if problem := port_problem(args.host, args.port):
        print(f"vae serve: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level_number, format=LOG_FORMAT)
    config = {
        "host": args.host,
        "port": args.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "http": HTTP_PROTOCOL,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "limit_concurrency": MAX_CONNECTIONS,
    }
    workers = args.workers or available_cpus()
    if workers > 1:
        return run_workers(
            workers, config, log_format=LOG_FORMAT, log_level=settings.log_level_number
        )
    uvicorn.run("service.main:create_app", factory=True, **config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vae` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MODEL_COMMANDS:
        return run_model_command(argv)
    if argv and argv[0] == "score":
        return run_score(argv[1:])
    args = build_parser().parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
