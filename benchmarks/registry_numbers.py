"""Measures the numbers the backbone registry stores: parameters, GFLOPs, feature width.

Builds every registered backbone with random weights at its default size (no ImageNet
download), counts parameters and FLOPs with transferlab.backbones.flops, and prints a table plus the
mismatches against the registry. Paste new values into src/transferlab/backbones/registry.py when Keras
changes. Run: ``.venv/bin/python benchmarks/registry_numbers.py [NAME ...]`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import sys
import time

from transferlab.backbones import flops, registry


def measure(name: str) -> dict:
    """Builds one backbone at its default size and returns what the registry should say."""
    import keras

    entry = registry.get(name)
    started = time.perf_counter()
    model = registry.build(entry, weights="none", image_size=entry.default_size)
    layer_names = {layer.name for layer in model.layers}
    row = {
        "name": entry.name,
        "parameters": flops.count_parameters(model),
        "gflops": round(flops.count_flops(model) / 1e9, 3),
        "feature_dim": int(model.output.shape[-1]),
        "finetune_from_exists": entry.finetune_from is None or entry.finetune_from in layer_names,
        "seconds": round(time.perf_counter() - started, 1),
    }
    keras.backend.clear_session()
    return row


def main(selected: list[str]) -> int:
    mismatches = 0
    print(f"{'name':22} {'parameters':>12} {'GFLOPs':>7} {'width':>6} finetune seconds")
    for name in selected or registry.names():
        row = measure(name)
        entry = registry.get(name)
        print(
            f"{row['name']:22} {row['parameters']:12d} {row['gflops']:7.3f} {row['feature_dim']:6d} "
            f"{str(row['finetune_from_exists']):8} {row['seconds']}"
        )
        stored = (entry.parameters, entry.gflops, entry.feature_dim, True)
        if stored != (row["parameters"], row["gflops"], row["feature_dim"], row["finetune_from_exists"]):
            mismatches += 1
            print(f"  registry says {stored}")
    print(f"{mismatches} mismatch(es)")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
