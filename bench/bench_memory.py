"""Bytes of ALQ state per quantized weight, outside STE and during STE, for the registry's models and a
small GPT-style language model.

    python bench/bench_memory.py          # writes bench/results/memory.json and its bench/RESULTS.md section

The state of a layer of ``G`` groups of ``n`` weights with ``K`` slots is ``codes`` (1 B per weight),
``weight_m/v/vmax`` (12 B per weight), ``coords``, ``mask`` and ``coord_m/v/vmax`` (17·K B per group) and,
during STE only, ``latent`` (4 B per weight). The figures are read off the buffers a real ``attach`` registers
(nothing is trained), for the structures and ``max_bits`` each model is quantized with. Training adds the
buckets' step buffers (the gathered gradient and ŵ, 4 B each per weight, and the per-group step counters),
read off the bound buckets.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from torch import nn

from alq_lightning.layers import LayerSelection, attach
from alq_lightning.models import MODEL_NAMES, PAPER_MAX_BITS, build_model, paper_structures
from alq_lightning.network import MultiBitNetwork

from common import git_state, hardware, write_section

HERE = Path(__file__).resolve().parent
SHAPES = {"lenet5": (1, 10, 28), "vgg_small": (3, 10, 32), "resnet20": (3, 10, 32), "resnet18": (3, 1000, 224),
          "resnet34": (3, 1000, 224), "vit_tiny": (1, 10, 28)}


class TinyGPT(nn.Module):
    """A GPT-style character model: token and position embeddings, 4 pre-norm layers of width 256, a head."""

    def __init__(self, vocab: int = 256, dim: int = 256, layers: int = 4, context: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(1, context, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)


def state_bytes(network: MultiBitNetwork) -> int:
    return sum(tensor.numel() * tensor.element_size()
               for layer in network.layers.values() for tensor in layer.multibit_tensors().values())


def step_bytes(network: MultiBitNetwork) -> int:
    """Bytes of the buckets' own buffers (gradient, ŵ, step counters, group sizes, learning rate)."""
    return sum(tensor.numel() * tensor.element_size() for bucket in network.bound()
               for tensor in (bucket.grad, bucket.weight, bucket.lr, bucket.bucket.weight_steps,
                              bucket.bucket.coord_steps, bucket.bucket.group_sizes))


def measure(model: nn.Module, selection: LayerSelection) -> dict:
    """State bytes per quantized weight of ``model`` outside STE and during STE, and the step buffers."""
    network = MultiBitNetwork(*attach(model, selection))
    outside = state_bytes(network)
    network.start_ste()
    during = state_bytes(network)
    return {"weights": network.numel, "layers": len(network.layers), "float_candidates": len(network.float_layers),
            "bytes_per_weight": outside / network.numel, "bytes_per_weight_ste": during / network.numel,
            "step_buffer_bytes_per_weight": step_bytes(network) / network.numel}


def models() -> dict[str, tuple[nn.Module, LayerSelection]]:
    built = {}
    for name in MODEL_NAMES:
        in_channels, classes, size = SHAPES[name]
        model = build_model(name, in_channels, classes, size)
        built[name] = (model, LayerSelection(max_bits=PAPER_MAX_BITS[name],
                                             structures=paper_structures(name, model)))
    built["tiny_gpt"] = (TinyGPT(), LayerSelection(max_bits=6))
    return built


def markdown(results: dict) -> str:
    lines = [
        "## Memory of ALQ state per quantized weight",
        "",
        f"`python bench/bench_memory.py` on {results['date']} at {results['git_commit']}: bytes of multi-bit state",
        "(codes, coordinates, masks, AMSGrad statistics; latent weights during STE only) per quantized weight,",
        "for each model's paper structures and `max_bits` (`tiny_gpt`: automatic structures, `max_bits=6`).",
        "Training adds the step buffers of the buckets (gathered gradient, ŵ, per-group counters). A float32 weight",
        "itself is 4 B; Adam keeps 8 B more per parameter.",
        "",
        "| model | quantized weights | layers | B/weight | B/weight during STE | + step buffers (B/weight) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        lines.append(f"| {name} | {row['weights']:,} | {row['layers']} | {row['bytes_per_weight']:.2f} | "
                     f"{row['bytes_per_weight_ste']:.2f} | {row['step_buffer_bytes_per_weight']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    results = {"hardware": hardware(), "torch": torch.__version__,
               "date": datetime.datetime.now().isoformat(timespec="seconds"), **git_state(),
               "models": {name: measure(model, selection) for name, (model, selection) in models().items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    section = markdown(results)
    write_section(args.markdown, "memory", section)
    print(section)


if __name__ == "__main__":
    main()
