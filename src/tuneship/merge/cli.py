"""`tuneship merge ADAPTER --out DIR`."""

from __future__ import annotations

import click

from tuneship.cli import emit, json_option, overwrite_option


@click.command()
@click.argument("adapter")
@click.option(
    "--out", required=True, type=click.Path(), help="Directory to write the merged bf16 checkpoint to."
)
@click.option(
    "--base", help="Base model spec to merge into; refused unless it is the base the adapter was trained on."
)
@click.option("--max-shard-size", default="1GB", show_default=True, help="Largest safetensors shard.")
@click.option(
    "--tolerance",
    type=float,
    default=None,
    help="Max |logit diff| vs base+adapter, as a fraction of the adapter's own effect on the logits [default: 0.5].",
)
@click.option(
    "--allow-pickle", is_flag=True, help="Load pickle (.bin) weights; they can run code, trust the source."
)
@overwrite_option
@json_option
def merge(adapter, out, base, max_shard_size, tolerance, allow_pickle, overwrite, as_json) -> None:
    """Merge ADAPTER (an adapter dir or NAME@vN) into its base in bf16, save sharded safetensors with the
    tokenizer, and verify the merged logits against base+adapter."""
    from tuneship.merge.merge import DEFAULT_TOLERANCE, merge_adapter

    result = merge_adapter(
        adapter,
        out,
        base=base,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
        allow_pickle=allow_pickle,
    )
    m = result["metrics"]
    emit(
        result,
        as_json,
        f"merged {result['adapter']} -> {result['out']} (max |logit diff| {m['max_abs_diff']:.3g}, "
        f"bound {m['bound']:.3g}, adapter effect {m['adapter_effect_max_abs']:.3g})",
    )
