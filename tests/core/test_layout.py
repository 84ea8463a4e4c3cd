"""Group layouts against the structure table of the specification (§1), checked with explicit index loops."""
import ast
import itertools
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alq_lightning.core.layout import STRUCTURES, GroupLayout, auto_layout, auto_subchannels, parse_structure

CONV_SHAPES = {
    "conv1d": (4, 3, 5),
    "conv2d": (4, 3, 3, 3),
    "conv3d": (2, 3, 2, 3, 2),
    "grouped": (6, 2, 3, 3),  # Conv2d(6, 6, 3, groups=3): Ci per group = 2
    "depthwise": (8, 1, 3, 3),
    "pointwise": (5, 4, 1, 1),
    "rect": (3, 2, 1, 4),
}
LINEAR_CASES = [((6, 12), s) for s in (1, 2, 3, 4, 6, 12)] + [((3, 7), 1), ((3, 7), 7), ((1, 1), 1)]
ROWS_CASES = [((2, 3, 8), 2), ((1, 5, 4), 1), ((2, 2, 2, 6), 3)]  # Bilinear, position embedding, any N-D
COLUMN_CASES = [((12, 6), 1), ((12, 6), 3), ((7, 3), 7), ((1, 1), 1)]  # (in, out), used as x @ W


def oracle_groups(structure, w, subchannels=1):
    """The groups of the spec table, built element by element, in row-major group order."""
    if structure == "subchannelwise":  # rows over every leading index, each cut in S chunks of the last dim
        *lead, cols = w.shape
        n = cols // subchannels
        rows = itertools.product(*(range(k) for k in lead))
        return [[w[(*r, s * n + j)].item() for j in range(n)] for r in rows for s in range(subchannels)]
    if structure == "columnwise":  # the inputs of one output, cut in S chunks
        inputs, outputs = w.shape
        n = inputs // subchannels
        return [[w[s * n + j, o].item() for j in range(n)] for o in range(outputs) for s in range(subchannels)]
    co, ci, *kernel = w.shape
    taps = list(itertools.product(*(range(k) for k in kernel)))
    if structure == "kernelwise":  # one kernel W[o, i, ...]
        return [[w[(o, i, *t)].item() for t in taps] for o in range(co) for i in range(ci)]
    if structure == "pixelwise":  # all input channels at one tap W[o, :, tap]
        return [[w[(o, i, *t)].item() for i in range(ci)] for o in range(co) for t in taps]
    assert structure == "channelwise"  # one whole filter W[o]
    return [[w[(o, i, *t)].item() for i in range(ci) for t in taps] for o in range(co)]


def expected_size(structure, shape, subchannels=1):
    """(num_groups, group_size) from the spec table."""
    if structure == "subchannelwise":
        return math.prod(shape[:-1]) * subchannels, shape[-1] // subchannels
    if structure == "columnwise":
        return shape[1] * subchannels, shape[0] // subchannels
    co, ci, *kernel = shape
    taps = math.prod(kernel)
    return {"kernelwise": (co * ci, taps), "pixelwise": (co * taps, ci), "channelwise": (co, ci * taps)}[structure]


def unique_weight(shape):
    return torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) * 0.5 - 3.0


CASES = [(s, shape, 1) for s in ("kernelwise", "pixelwise", "channelwise") for shape in CONV_SHAPES.values()]
CASES += [("subchannelwise", shape, s) for shape, s in LINEAR_CASES + ROWS_CASES]
CASES += [("columnwise", shape, s) for shape, s in COLUMN_CASES]


@pytest.mark.parametrize("structure,shape,subchannels", CASES)
def test_groups_match_spec_definition(structure, shape, subchannels):
    layout = GroupLayout(structure, shape, subchannels)
    w = unique_weight(shape)
    groups = layout.to_groups(w)
    assert (layout.num_groups, layout.group_size) == expected_size(structure, shape, subchannels)
    assert tuple(groups.shape) == (layout.num_groups, layout.group_size)
    assert layout.num_groups * layout.group_size == layout.numel == w.numel()
    assert groups.tolist() == oracle_groups(structure, w, subchannels)


@pytest.mark.parametrize("structure,shape,subchannels", CASES)
def test_round_trip_is_exact(structure, shape, subchannels):
    layout = GroupLayout(structure, shape, subchannels)
    w = torch.randn(shape, dtype=torch.float64)
    back = layout.from_groups(layout.to_groups(w))
    assert back.shape == w.shape and torch.equal(back, w)
    groups = torch.randn(layout.num_groups, layout.group_size, dtype=torch.float64)
    assert torch.equal(layout.to_groups(layout.from_groups(groups)), groups)


@given(
    kernel=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    co=st.integers(1, 4),
    ci=st.integers(1, 5),
    structure=st.sampled_from(["kernelwise", "pixelwise", "channelwise"]),
)
@settings(max_examples=40, deadline=None)
def test_conv_layouts_property(kernel, co, ci, structure):
    shape = (co, ci, *kernel)
    layout = GroupLayout(structure, shape)
    w = unique_weight(shape)
    assert (layout.num_groups, layout.group_size) == expected_size(structure, shape)
    assert layout.to_groups(w).tolist() == oracle_groups(structure, w)
    assert torch.equal(layout.from_groups(layout.to_groups(w)), w)


@given(rows=st.integers(1, 4), chunk=st.integers(1, 6), subchannels=st.integers(1, 5))
@settings(max_examples=30, deadline=None)
def test_linear_layouts_property(rows, chunk, subchannels):
    shape = (rows, chunk * subchannels)
    layout = GroupLayout("subchannelwise", shape, subchannels)
    w = unique_weight(shape)
    assert (layout.num_groups, layout.group_size) == (rows * subchannels, chunk)
    assert layout.to_groups(w).tolist() == oracle_groups("subchannelwise", w, subchannels)
    assert torch.equal(layout.from_groups(layout.to_groups(w)), w)


def test_unknown_structure_names_argument_and_allowed_values():
    pattern = r"structure='blockwise'.*kernelwise.*pixelwise.*channelwise.*subchannelwise"
    with pytest.raises(ValueError, match=pattern):
        GroupLayout("blockwise", (4, 3, 3, 3))
    with pytest.raises(ValueError, match=pattern):
        parse_structure("blockwise")
    with pytest.raises(ValueError, match=pattern):
        auto_layout((4, 3, 3, 3), "blockwise")
    with pytest.raises(ValueError, match=r"structure='pixelwise\(2\)'.*subchannelwise"):
        parse_structure("pixelwise(2)")


def allowed_names(message):
    """The structure names an error message offers after ``allowed:`` (up to an ``or`` clause)."""
    listed = re.search(r"allowed: (.*?)(?: or |;|$)", message)[1]
    return [name.strip() for name in listed.split(",")]


def test_unknown_structure_errors_offer_exactly_the_valid_names():
    """The names an error offers are exactly the structures, each accepted as written."""
    for call in (lambda: GroupLayout("blockwise", (4, 3, 3, 3)), lambda: parse_structure("blockwise")):
        with pytest.raises(ValueError) as error:
            call()
        names = allowed_names(str(error.value))
        assert sorted(names) == sorted(STRUCTURES)
        assert all(parse_structure(name) == (name, 1) for name in names)


@pytest.mark.parametrize("in_features", [1, 7, 10, 12])
def test_subchannels_error_offers_exactly_the_valid_choices(in_features):
    """The divisors an error offers are exactly the ``S`` a layout accepts for that input size."""
    valid = []
    for s in range(1, in_features + 2):
        try:
            GroupLayout("subchannelwise", (2, in_features), s)
            valid.append(s)
        except ValueError:
            pass
    with pytest.raises(ValueError) as error:
        GroupLayout("subchannelwise", (2, in_features), in_features + 1)
    offered = ast.literal_eval(re.search(r"one of (\[.*\])", str(error.value))[1])
    assert offered == valid and valid[0] == 1 and valid[-1] == in_features


@pytest.mark.parametrize("subchannels", [3, 4, 0, -2])
def test_subchannels_not_dividing_input(subchannels):
    with pytest.raises(ValueError, match=rf"subchannels={subchannels}\b.*divisor.*\b10\b"):
        GroupLayout("subchannelwise", (4, 10), subchannels)
    if subchannels > 0:
        with pytest.raises(ValueError, match=rf"subchannels={subchannels}\b.*divisor.*\b10\b"):
            auto_layout((4, 10), f"subchannelwise({subchannels})")


def test_structure_and_shape_mismatch():
    with pytest.raises(ValueError, match=r"structure='pixelwise'.*subchannelwise"):
        GroupLayout("pixelwise", (4, 10))
    with pytest.raises(ValueError, match=r"structure='columnwise'.*\(in, out\)"):
        GroupLayout("columnwise", (4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"subchannels=2.*subchannelwise"):
        GroupLayout("kernelwise", (4, 3, 3, 3), 2)
    with pytest.raises(ValueError, match=r"shape"):
        GroupLayout("kernelwise", (4, 0, 3, 3))


@pytest.mark.parametrize("structure,shape,subchannels", [CASES[0], CASES[7], ("subchannelwise", (6, 12), 3)])
def test_to_groups_rejects_wrong_shape(structure, shape, subchannels):
    layout = GroupLayout(structure, shape, subchannels)
    wrong = torch.zeros(math.prod(shape))
    with pytest.raises(ValueError, match=r"shape"):
        layout.to_groups(wrong)
    with pytest.raises(ValueError, match=r"shape"):
        layout.to_groups(torch.zeros(*shape[:-1], shape[-1] + 1))


def test_parse_structure():
    assert parse_structure("pixelwise") == ("pixelwise", 1)
    assert parse_structure("kernelwise") == ("kernelwise", 1)
    assert parse_structure("channelwise") == ("channelwise", 1)
    assert parse_structure("subchannelwise") == ("subchannelwise", 1)
    assert parse_structure("subchannelwise(4)") == ("subchannelwise", 4)
    assert parse_structure("subchannelwise:16") == ("subchannelwise", 16)
    assert parse_structure("columnwise(3)") == ("columnwise", 3)
    assert set(STRUCTURES) == {"kernelwise", "pixelwise", "channelwise", "subchannelwise", "columnwise"}


def test_parse_structure_ignores_spaces():
    assert parse_structure(" pixelwise ") == ("pixelwise", 1)
    assert parse_structure("subchannelwise (4)") == ("subchannelwise", 4)
    assert parse_structure("subchannelwise: 16") == ("subchannelwise", 16)


@pytest.mark.parametrize("structure,shape,subchannels", CASES)
def test_describe_is_a_spec_of_the_same_layout(structure, shape, subchannels):
    layout = GroupLayout(structure, shape, subchannels)
    assert auto_layout(shape, layout.describe()) == layout


@pytest.mark.parametrize("shape", [[4, 16, 3, 3], torch.Size([4, 16, 3, 3]), (torch.tensor(4), 16, 3, 3)])
def test_shape_is_normalised_to_a_tuple_of_ints(shape):
    """A layout built from a list, a ``torch.Size`` or tensor sizes equals (and hashes like) the tuple one."""
    layout, reference = GroupLayout("pixelwise", shape), GroupLayout("pixelwise", (4, 16, 3, 3))
    assert layout == reference and hash(layout) == hash(reference)
    assert type(layout.shape) is tuple and all(type(s) is int for s in layout.shape)
    weight = torch.randn(4, 16, 3, 3)
    assert torch.equal(layout.from_groups(layout.to_groups(weight)), weight)


@pytest.mark.parametrize("ci", [16, 17, 64, 512])
@pytest.mark.parametrize("kernel", [(3,), (3, 3), (1, 1), (3, 3, 3)])
def test_auto_layout_pixelwise_for_wide_inputs(ci, kernel):
    layout = auto_layout((8, ci, *kernel))
    assert layout.structure == "pixelwise" and layout.group_size == ci


@pytest.mark.parametrize("ci", [1, 3, 15])
@pytest.mark.parametrize("kernel", [(3,), (3, 3), (5, 5), (1, 1), (2, 2), (3, 3, 3)])
def test_auto_layout_narrow_inputs(ci, kernel):
    layout = auto_layout(torch.Size((8, ci, *kernel)))
    assert layout.structure in ("kernelwise", "channelwise")
    # documented rule: kernelwise when the kernel has at least 9 taps
    assert layout.structure == ("kernelwise" if math.prod(kernel) >= 9 else "channelwise")


def test_auto_layout_explicit_structure_wins():
    assert auto_layout((8, 32, 3, 3), "kernelwise").structure == "kernelwise"
    layout = auto_layout((10, 64), "subchannelwise(4)")
    assert (layout.structure, layout.subchannels, layout.group_size) == ("subchannelwise", 4, 16)
    with pytest.raises(ValueError, match="shape"):
        auto_layout((10,))


@pytest.mark.parametrize("shape,kind,expected", [
    ((8, 32, 3, 3), "auto", ("pixelwise", 1)),
    ((8, 3, 3, 3), "conv", ("kernelwise", 1)),
    ((10, 2048), "auto", ("subchannelwise", 2)),
    ((10, 2048), "rows", ("subchannelwise", 2)),
    ((1, 5, 2048), "rows", ("subchannelwise", 2)),  # rows over every leading index, chunks of the last dimension
    ((2048, 10), "columns", ("columnwise", 2)),  # (in, out) used as x @ W: chunks of the inputs of one output
    ((3000, 2048), "columns", ("columnwise", 3)),
])
def test_auto_layout_default_of_each_kind(shape, kind, expected):
    """Each kind's documented default; chunks of the rows/columns kinds hold at most 1024 weights."""
    layout = auto_layout(shape, kind=kind)
    assert (layout.structure, layout.subchannels) == expected
    assert layout.structure in ("pixelwise", "kernelwise") or layout.group_size <= 1024


def test_auto_layout_refuses_an_unknown_kind_and_names_the_valid_ones():
    with pytest.raises(ValueError, match="kind='diagonal'") as error:
        auto_layout((4, 4), kind="diagonal")
    offered = allowed_names(str(error.value))
    assert offered == ["auto", "conv", "rows", "columns"]
    for kind in offered:  # each is accepted (a conv kind for a matrix fails on the shape, not on the kind)
        try:
            auto_layout((4, 4), kind=kind)
        except ValueError as shape_error:
            assert "kind=" not in str(shape_error)
    with pytest.raises(ValueError, match=r"shape=\(4, 10\).*Conv weight"):
        auto_layout((4, 10), kind="conv")


@given(in_features=st.integers(1, 5000))
@settings(max_examples=50, deadline=None)
def test_auto_subchannels_chunk_size(in_features):
    layout = auto_layout((3, in_features))
    s = layout.subchannels
    assert layout.structure == "subchannelwise" and in_features % s == 0 and s == auto_subchannels(in_features)
    chunk = in_features // s
    assert chunk <= 1024
    if in_features <= 1024:
        assert s == 1
    # whenever a chunk of 256..1024 weights is possible, the automatic choice holds one
    if any(in_features % d == 0 for d in range(256, 1025)):
        assert 256 <= chunk <= 1024


@pytest.mark.parametrize("in_features,chunk", [(784, 784), (2048, 1024), (4096, 1024), (3072, 1024), (1500, 750)])
def test_auto_subchannels_figures(in_features, chunk):
    assert auto_layout((10, in_features)).group_size == chunk


@pytest.mark.parametrize(("shape", "first", "second", "same"), [
    ((4, 1, 5, 5), "kernelwise", "channelwise", True),  # one input channel: a kernel is the whole filter
    ((4, 2, 1, 2), "kernelwise", "subchannelwise(1)", True),
    ((4, 9, 3, 3), "kernelwise", "pixelwise", False),  # both [36, 9], other weights in each group
    ((8, 8), "subchannelwise(1)", "columnwise(1)", False),  # both [8, 8]: rows against columns
    ((8, 8), "subchannelwise(2)", "subchannelwise(2)", True),
    ((4, 2, 3, 3), "kernelwise", "channelwise", False),  # other group sizes
])
def test_same_groups_compares_which_weight_lands_where(shape, first, second, same):
    a, b = auto_layout(shape, first), auto_layout(shape, second)
    assert a.same_groups(b) is same and b.same_groups(a) is same
    if same:
        weight = torch.randn(shape)
        assert torch.equal(a.to_groups(weight), b.to_groups(weight))
