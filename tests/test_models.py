"""Model zoo: output shapes, parameter counts, registry errors and the paper's structure presets."""
from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from alq_lightning.models import (
    MODEL_NAMES,
    PAPER_MAX_BITS,
    PAPER_STRUCTURES,
    LeNet5,
    ResNet18,
    ResNet20,
    ResNet34,
    VGGSmall,
    ViTTiny,
    build_model,
    paper_structures,
)

STRUCTURE_NAMES = ("kernelwise", "pixelwise", "channelwise")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(cls: type[nn.Module], **kwargs: object) -> nn.Module:
    with torch.device("meta"):
        return cls(**kwargs)


@pytest.mark.parametrize(
    ("name", "channels", "size", "kwargs"),
    [
        ("lenet5", 1, 28, {}),
        ("lenet5", 3, 32, {}),
        ("vgg_small", 3, 32, {"width": 0.25}),
        ("vgg_small", 1, 28, {"width": 0.1}),
        ("resnet20", 3, 32, {}),
        ("resnet18", 3, 32, {}),
        ("resnet34", 3, 32, {}),
        ("resnet18", 3, 64, {}),
        ("resnet34", 3, 64, {}),
        ("vit_tiny", 1, 28, {}),
        ("vit_tiny", 1, 28, {"patch_size": 7, "depth": 2, "dropout": 0.1}),
        ("vit_tiny", 3, 32, {"dim": 48, "heads": 3, "mlp_ratio": 4}),
    ],
)
def test_output_shape(name: str, channels: int, size: int, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, channels, 7, size, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(2 if size <= 32 else 1, channels, size, size))
    assert out.shape == (2 if size <= 32 else 1, 7)
    assert torch.isfinite(out).all()


def test_lenet5_layers_and_count() -> None:
    model = LeNet5()
    assert [n for n, _ in model.named_children()][:4] == ["conv1", "conv2", "fc1", "fc2"]
    assert model.fc1.in_features == 800 and model.fc1.out_features == 500
    assert count_parameters(model) == 431080
    assert LeNet5(input_size=32).fc1.in_features == 50 * 5 * 5


def test_lenet5_order_pool_before_relu() -> None:
    model = LeNet5()
    x = torch.randn(3, 1, 28, 28)
    h = torch.relu(torch.max_pool2d(model.conv1(x), 2))
    h = torch.relu(torch.max_pool2d(model.conv2(h), 2))
    expected = model.fc2(torch.relu(model.fc1(h.flatten(1))))
    torch.testing.assert_close(model(x), expected)


def test_vit_tiny_parameters_and_count() -> None:
    model = ViTTiny(patch_size=7)
    matrices = {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() >= 2}
    layer = {"self_attn.in_proj_weight": (192, 64), "self_attn.out_proj.weight": (64, 64),
             "linear1.weight": (128, 64), "linear2.weight": (64, 128)}
    assert matrices == {
        "class_token": (1, 64),
        "position_embedding": (17, 64),
        "patch_embedding.weight": (64, 1, 7, 7),
        **{f"encoder.layers.{i}.{name}": shape for i in range(4) for name, shape in layer.items()},
        "head.weight": (10, 64),
    }
    # Q, K and V are one raw Parameter of nn.MultiheadAttention, the class token and position embedding raw
    # Parameters of the model: no Linear/Conv module holds them.
    attention = model.encoder.layers[0].self_attn
    assert isinstance(attention, nn.MultiheadAttention) and attention.in_proj_weight is not None
    held = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    raw = [n for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in held]
    assert raw == ["class_token", "position_embedding"] + [f"encoder.layers.{i}.self_attn.in_proj_weight"
                                                           for i in range(4)]
    # matrices: 64 + 17*64 + 64*49 + 4 * (3*64*64 + 64*64 + 2 * 64*128) + 10*64 = 136 000; vectors (biases,
    # LayerNorms): 64 + 4 * (3*64 + 64 + 128 + 64 + 4*64) + 2*64 + 10 = 3 018.
    assert sum(p.numel() for n, p in model.named_parameters() if n in matrices) == 136_000
    assert count_parameters(model) == 139_018
    assert count_parameters(ViTTiny()) == 139_018 + (50 - 17) * 64 - 64 * (49 - 16)
    layer_0 = model.encoder.layers[0]
    assert layer_0.norm_first and layer_0.self_attn.batch_first and layer_0.self_attn.num_heads == 4


def test_vit_tiny_forward_by_hand() -> None:
    torch.manual_seed(0)
    model = ViTTiny(patch_size=7, depth=2).eval()
    x = torch.randn(3, 1, 28, 28)
    tokens = model.patch_embedding(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.class_token.expand(3, 1, 64), tokens], dim=1) + model.position_embedding
    for layer in model.encoder.layers:
        h = layer.norm1(tokens)
        tokens = tokens + layer.self_attn(h, h, h, need_weights=False)[0]
        tokens = tokens + layer.linear2(torch.nn.functional.gelu(layer.linear1(layer.norm2(tokens))))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.norm(tokens[:, 0])), atol=1e-5, rtol=1e-5)


def test_resnet_counts() -> None:
    assert count_parameters(build_on_meta(ResNet18)) == 11_689_512
    assert count_parameters(build_on_meta(ResNet34)) == 21_797_672
    # ResNet-20, option B: stem 3*16*9 + 32 = 464; stage 1: 3 blocks * 2 * (16*16*9 + 32) = 14 016;
    # stage 2: (16*32*9 + 64) + (32*32*9 + 64) + (16*32 + 64) + 2 blocks * 2 * (32*32*9 + 64) = 51 648;
    # stage 3: (32*64*9 + 128) + (64*64*9 + 128) + (32*64 + 128) + 2 * 2 * (64*64*9 + 128) = 205 696;
    # fc: 64*10 + 10 = 650. Total 272 474 (option A, without the two 1x1 shortcuts, has 269 722).
    assert count_parameters(ResNet20()) == 272_474


def test_resnet_torchvision_names_and_stems() -> None:
    big = build_on_meta(ResNet18, input_size=224)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d)
    names = {n for n, _ in big.named_parameters()}
    assert {"conv1.weight", "bn1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.bias", "fc.weight"} <= names
    small = build_on_meta(ResNet18, input_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert count_parameters(big) - count_parameters(small) == 64 * 3 * (49 - 9)


def test_resnet20_shortcuts_are_1x1_convs() -> None:
    model = ResNet20()
    shortcuts = [n for n, m in model.named_modules() if n.endswith("downsample.0")]
    assert shortcuts == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    assert model.layer2[0].downsample[0].kernel_size == (1, 1)
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)][-1] == 64


def test_vgg_small_full_width_structure() -> None:
    model = build_on_meta(VGGSmall)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(8192, 1024), (1024, 1024), (1024, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 3


def test_vgg_small_width_rounds_to_integers() -> None:
    model = VGGSmall(width=0.3)
    convs = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs == [38, 38, 77, 77, 154, 154]
    assert model.classifier[0].in_features == 154 * 16 and model.classifier[0].out_features == 307
    assert min(m.out_channels for m in VGGSmall(width=0.001).modules() if isinstance(m, nn.Conv2d)) == 1


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: build_model("alexnet", 3, 10, 32), "name='alexnet'"),
        (lambda: paper_structures("vgg16"), "name='vgg16'"),
        (lambda: LeNet5(input_size=12), "input_size=12"),
        (lambda: LeNet5(num_classes=0), "num_classes=0"),
        (lambda: VGGSmall(width=0), "width=0"),
        (lambda: VGGSmall(input_size=4), "input_size=4"),
        (lambda: ResNet20(width=0), "width=0"),
        (lambda: ResNet18(in_channels=2.5), "in_channels=2.5"),
        (lambda: ViTTiny(patch_size=5), "input_size=28 is not a multiple of patch_size=5"),
        (lambda: ViTTiny(dim=64, heads=6), "dim=64 is not a multiple of heads=6"),
        (lambda: ViTTiny(depth=0), "depth=0"),
        (lambda: ViTTiny(dropout=1.0), "dropout=1.0"),
    ],
)
def test_invalid_arguments(call, argument: str) -> None:
    with pytest.raises(ValueError, match=argument.replace("(", r"\(")) as info:
        call()
    if argument.startswith("name="):
        assert all(name in str(info.value) for name in MODEL_NAMES)


def check_preset(model: nn.Module, preset: dict[str, str]) -> None:
    modules = dict(model.named_modules())
    layers = {n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    covered: set[str] = set()
    for pattern, structure in preset.items():
        matched = fnmatch.filter(modules, pattern)
        assert matched, f"{pattern} names no module"
        for name in matched:
            module = modules[name]
            if isinstance(module, nn.Linear):
                assert structure.startswith("subchannelwise(")
                assert module.in_features % int(structure[len("subchannelwise(") : -1]) == 0
            else:
                assert isinstance(module, nn.Conv2d) and structure in STRUCTURE_NAMES
        covered.update(matched)
    assert covered == layers


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_paper_presets_name_existing_layers(name: str) -> None:
    assert set(PAPER_STRUCTURES) == set(MODEL_NAMES) == set(PAPER_MAX_BITS)
    with torch.device("meta"):
        model = build_model(name, 3, 10, 32)
    check_preset(model, PAPER_STRUCTURES[name])
    check_preset(model, paper_structures(name, model))


def test_paper_presets_match_the_paper() -> None:
    assert PAPER_STRUCTURES["lenet5"] == {
        "conv1": "kernelwise",
        "conv2": "kernelwise",
        "fc1": "subchannelwise(2)",
        "fc2": "subchannelwise(1)",
    }
    vgg = PAPER_STRUCTURES["vgg_small"]
    assert list(vgg.values()) == ["channelwise"] + ["pixelwise"] * 5 + [
        "subchannelwise(16)",
        "subchannelwise(2)",
        "subchannelwise(2)",
    ]
    for name, convs in [("resnet18", 20), ("resnet34", 36), ("resnet20", 21)]:
        preset = PAPER_STRUCTURES[name]
        assert preset["conv1"] == "channelwise" and preset["fc"] == "subchannelwise(2)"
        assert list(preset.values()).count("pixelwise") == convs - 1 and len(preset) == convs + 1
    vit = dict(PAPER_STRUCTURES["vit_tiny"])
    assert vit.pop("patch_embedding") == "channelwise" and set(vit.values()) == {"subchannelwise(1)"}
    assert len(vit) == 4 * 3 + 1 and "head" in vit
    assert PAPER_MAX_BITS == {"lenet5": 6, "vgg_small": 6, "resnet20": 6, "resnet18": 8, "resnet34": 8,
                              "vit_tiny": 6}


@pytest.mark.parametrize("width", [0.25, 0.3, 0.13, 0.01])
def test_vgg_preset_stays_valid_when_width_reduced(width: float) -> None:
    model = VGGSmall(width=width, input_size=32)
    preset = paper_structures("vgg_small", model)
    check_preset(model, preset)
    if width == 0.25:
        assert preset["classifier.0"] == "subchannelwise(16)" and preset["classifier.3"] == "subchannelwise(2)"
    if width == 0.3:
        assert preset["classifier.3"] == "subchannelwise(1)"


def test_paper_structures_rejects_a_foreign_model() -> None:
    with pytest.raises(ValueError, match="Linear"):
        paper_structures("lenet5", ResNet20())
