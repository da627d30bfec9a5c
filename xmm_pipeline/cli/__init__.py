"""`xmm-pipeline ...`: the same code as the Dagster assets, without Dagster.

Each sub-command lives in its own module of this package, exposing `add_arguments(parser)` and
`run(args) -> int`; heavy libraries (torch, faiss, dagster) are imported inside `run` so that
`--help` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xmm_pipeline.errors import ProductError, UserError

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": (
        "xmm_pipeline.cli.simulate",
        "write a simulated XMM-Newton archive (catalogue + PPS products)",
    ),
    "preprocess": ("xmm_pipeline.cli.preprocess", "select, bin and unfold pn spectra into Parquet"),
    "train": ("xmm_pipeline.cli.train", "train the VAE with the DeepONet decoder"),
    "embed": ("xmm_pipeline.cli.latent", "encode spectra and build the latent products"),
    "similar": ("xmm_pipeline.cli.latent", "nearest neighbours of a detection or a spectrum file"),
    "outliers": ("xmm_pipeline.cli.latent", "the most unusual spectra"),
    "trajectory": ("xmm_pipeline.cli.latent", "a source's path through latent space"),
    "show": ("xmm_pipeline.cli.latent", "a spectrum with its reconstruction"),
    "evaluate": ("xmm_pipeline.cli.latent", "write docs/EVALUATION.md with figures"),
    "export": ("xmm_pipeline.cli.latent", "the latent catalogue as FITS, VOTable, Parquet, CSV or over SAMP"),
    "download": ("xmm_pipeline.cli.download", "fetch pn spectral products from the XSA"),
    "explore": ("xmm_pipeline.cli.explore", "browse the latent map in a web browser (127.0.0.1)"),
    "demo": ("xmm_pipeline.cli.demo", "run the whole Dagster pipeline on the embedded default"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmm-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command, name)
        command.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (UserError, ProductError) as error:
        print(f"xmm-pipeline {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
