"""`vae`: serve a bundle, or train / export / evaluate a model (those need the train extra)."""

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from service.bundle import BundleError, read_manifest, select_providers
from service.settings import Settings

log = logging.getLogger("service.cli")

MODEL_COMMANDS = {
    "train": "train a VAE on images",
    "export": "export a checkpoint to a bundle (manifest.json + ONNX)",
    "evaluate": "evaluate a checkpoint or bundle on test data",
}
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
SERVE_ENV = {"bundle": "VAE_BUNDLE", "device": "VAE_DEVICE", "log_level": "VAE_LOG_LEVEL"}


def build_parser() -> argparse.ArgumentParser:
    """The `vae` argument parser; model commands pass their arguments through untouched."""
    parser = argparse.ArgumentParser(
        prog="vae",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a bundle over HTTP (settings also come from VAE_* variables)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--bundle", help="bundle directory (default: $VAE_BUNDLE or models/mnist)")
    serve.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="default: $VAE_DEVICE or auto"
    )
    serve.add_argument("--workers", type=int, default=1, help="worker processes")
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="default: $VAE_LOG_LEVEL or info",
    )
    for name, help_text in MODEL_COMMANDS.items():
        commands.add_parser(name, help=f"{help_text} (needs: pip install 'vae-server[train]')")
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


def serve(args: argparse.Namespace) -> int:
    """Validate the configuration, then run uvicorn with the app factory."""
    import uvicorn

    for field, env in SERVE_ENV.items():
        value = getattr(args, field)
        if value is not None:
            os.environ[env] = str(value)  # workers build their settings from the environment
    try:
        settings = Settings()
        read_manifest(settings.bundle)
        select_providers(settings.device)
    except ValidationError as exc:
        print(f"vae serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    except BundleError as exc:
        print(f"vae serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level_number, format=LOG_FORMAT)
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout_s or None,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vae` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MODEL_COMMANDS:
        return run_model_command(argv)
    args = build_parser().parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
