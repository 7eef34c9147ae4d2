"""The `tuneship` command: a thin click group.

Each stage keeps its own commands in `tuneship/<stage>/cli.py`; they are imported only when run (LazyGroup),
so `tuneship --help` and the registry commands start without importing torch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from typing import Any

import click

from tuneship import __version__
from tuneship.errors import TuneshipError

# Before torch loads: idle OpenMP threads sleep instead of spinning (a large win on small shared CPUs).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_STDOUT = None  # the real stdout while a --json command runs (see main)

# command name -> "module:attribute" of a click command or group
COMMANDS = {
    "data": ("tuneship.data.cli:data", "Generate the demo data set, or clean and split your own."),
    "train": ("tuneship.train.cli:train", "QLoRA-train an adapter with TRL's SFTTrainer."),
    "plan": (
        "tuneship.train.plan_cli:plan",
        "Predict peak GPU memory and pick batch settings that fit a card.",
    ),
    "eval": (
        "tuneship.eval.cli:eval_cmd",
        "Evaluate a model (and a baseline) with CIs and a side-by-side report.",
    ),
    "merge": ("tuneship.merge.cli:merge", "Merge an adapter into its bf16 base and verify the logits."),
    "export": (
        "tuneship.export.cli:export",
        "Export to GGUF (+ Ollama Modelfile) or to the Hugging Face Hub.",
    ),
    "serve": (
        "tuneship.serve.cli:serve",
        "Serve a GGUF, or every version on a registered name's route behind the router.",
    ),
    "registry": (
        "tuneship.registry.cli:registry",
        "Versioned adapters: lineage, aliases, promotion gates, rollback.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, short_help = COMMANDS[name]
        module, attr = target.split(":")
        try:
            cmd = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("tuneship"):

                @click.command(name=name, help=short_help + " (not available in this build)")
                def unavailable() -> None:
                    raise TuneshipError(f"'tuneship {name}' is not available in this build")

                return unavailable
            raise
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table, so --help imports nothing.
        with formatter.section("Commands"):
            formatter.write_dl([(n, h) for n, (_, h) in COMMANDS.items()])


def emit(result: Any, as_json: bool, human: str | None = None) -> None:
    """Print a command's result: JSON on stdout with --json, else the human text."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str), file=_STDOUT or sys.stdout)
    elif human is not None:
        click.echo(human)


def json_option(f):
    return click.option(
        "--json", "as_json", is_flag=True, help="Print a machine-readable JSON summary on stdout."
    )(f)


def overwrite_option(f):
    return click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")(f)


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.version_option(__version__, prog_name="tuneship")
def cli() -> None:
    """tuneship: QLoRA fine-tuning to production serving for small language models.

    \b
    The path:  data -> train -> eval -> merge -> export -> registry -> serve
    Every command takes --json for a machine-readable summary on stdout.
    """


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns the exit status; user errors print one line, not a traceback."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if "--json" in args:
            # stdout carries only the JSON summary: whatever libraries print (the Trainer's log dicts,
            # llama.cpp's banners) goes to stderr, and `emit` writes to the real stdout.
            global _STDOUT
            _STDOUT = sys.stdout
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    rv = cli.main(args=args, prog_name="tuneship", standalone_mode=False)
            finally:
                _STDOUT = None
        else:
            rv = cli.main(args=args, prog_name="tuneship", standalone_mode=False)
    except TuneshipError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    # `python -m tuneship.cli`: run the importable module, so that stage commands, which import
    # `tuneship.cli`, share its state (the real stdout of a --json command) with this entry point.
    from tuneship.cli import run as _run

    _run()
