"""`xmm-pipeline explore`: browse a latent folder in a web browser (served on 127.0.0.1 by default).

The map of every detection, a picked detection's catalogue row, spectrum with the model's folded
reconstruction and residuals, its nearest other sources, the outlier list, trajectories, a user's own
spectrum placed on the map, and the selection exported as CSV, FITS or VOTable. The code is
xmm_pipeline/explore/; docs/LATENT.md, "Exploring the map", shows how to use it.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys

from xmm_pipeline.errors import UserError

DEFAULT_LATENT = "data/latent"
DEFAULT_PORT = 8050


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--latent", default=DEFAULT_LATENT, help=f"latent folder (default {DEFAULT_LATENT})")
    parser.add_argument("--spectra", help="spectra folder (default: the one embed used)")
    parser.add_argument("--model", help="model artifact (default: the one embed used)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")


def check_port_free(host: str, port: int) -> None:
    """Fail with one line, before loading anything, when the port cannot be bound."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            reason = "is in use" if error.errno == errno.EADDRINUSE else f"cannot be bound ({error.strerror})"
            raise UserError(f"port {port} on {host} {reason}; choose another with --port") from None


def run(args: argparse.Namespace) -> int:
    from xmm_pipeline.explore.app import serve
    from xmm_pipeline.explore.data import ExplorerData

    check_port_free(args.host, args.port)
    data = ExplorerData(args.latent, spectra_dir=args.spectra, model_dir=args.model)
    print(f"exploring {data.meta()['n_detections']} detections of {args.latent}: "
          f"open http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    serve(data, host=args.host, port=args.port)
    return 0
