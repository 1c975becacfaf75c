"""``transferlab backbones``: the registered backbones, or what a TFLite file offers as one.

The listing never imports TensorFlow, so it answers in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from transferlab.backbones import registry
from transferlab.tflite.describe import TFLiteInfo, describe_tflite

COLUMNS = ("name", "family", "size", "width", "parameters", "GFLOPs", "alphas", "official weights file (no top)")
FOOTNOTE = (
    "size: default input side; width: pooled feature width (alpha 1.0). parameters: without the top at alpha 1.0,\n"
    "summed over layers as the course counts them, (F_H x F_W x C + 1) x N_F per convolution, batch-norm\n"
    "statistics included. GFLOPs: 2 x multiply-adds of conv and dense layers per image at the default size.\n"
    "A TFLite file is a backbone too: tflite:PATH[#TENSOR]; describe one with --file PATH[#TENSOR]."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds this command's options."""
    parser.add_argument(
        "--file",
        metavar="PATH[#TENSOR]",
        help="describe a TFLite model as a backbone (optionally tapping a named tensor)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Prints the registry table, or the description of ``--file``; returns the exit code."""
    if args.file:
        spec = registry.parse_spec(registry.TFLITE_PREFIX + args.file, root=Path.cwd())
        info = describe_tflite(spec.path, spec.tensor or None)
        print(json.dumps(dataclasses.asdict(info), indent=2) if args.json else describe(info))
        return 0
    entries = [registry.get(name) for name in registry.names()]
    print(json.dumps([dataclasses.asdict(entry) for entry in entries], indent=2) if args.json else table(entries))
    return 0


def table(entries: list[registry.Backbone]) -> str:
    """The registry as an aligned text table with a footnote on the conventions."""
    rows = [COLUMNS] + [_row(entry) for entry in entries]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    numeric = {2, 3, 4, 5}
    lines = [
        "  ".join(
            cell.rjust(width) if index in numeric else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines) + "\n\n" + FOOTNOTE


def _row(entry: registry.Backbone) -> tuple[str, ...]:
    alphas = ", ".join(f"{alpha:g}" for alpha in entry.alphas) or "-"
    return (
        entry.name,
        entry.family,
        str(entry.default_size),
        str(entry.feature_dim),
        f"{entry.parameters:,}",
        f"{entry.gflops:.2f}",
        alphas,
        entry.weights_file,
    )


def describe(info: TFLiteInfo) -> str:
    """A TFLite backbone's description, one ``key: value`` per line."""
    scale, zero_point = info.input_quantization
    quantized = f", quantized scale {scale:.6g} zero point {zero_point}" if scale else ""
    out_scale, out_zero_point = info.output_quantization
    dequantized = f" (dequantized with scale {out_scale:.6g}, zero point {out_zero_point})" if out_scale else ""
    pooled = " after average pooling" if len(info.output_shape) > 2 else ""
    lines = [
        f"file: {info.path}",
        f"sha256: {info.sha256}",
        f"input: {info.input_name} {info.input_shape} {info.input_dtype}{quantized}",
        f"image size: {info.image_size}",
        f"output: {info.output_name} {info.output_shape} {info.output_dtype}{dequantized}",
        f"feature width: {info.feature_dim}{pooled}",
        f"parameters: {info.parameters:,}",
        f"GFLOPs per image: {info.gflops:.3f} (2 x multiply-adds of conv, depthwise and fully-connected ops)",
        f"spec: tflite:{info.path}" + (f"#{info.tensor}" if info.tensor else ""),
    ]
    return "\n".join(lines)
