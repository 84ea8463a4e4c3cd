"""ActivationQuantization's defaults and its argument errors, word for word: each names the argument, the value and
what is allowed."""
from __future__ import annotations

import pytest

from alq_lightning import ActivationQuantization


def test_defaults():
    quantization = ActivationQuantization()
    assert quantization.act_bits == 2 and quantization.per_layer == {"*": 2}
    assert quantization.start_epoch == 0 and quantization.unit == "epoch"
    assert quantization.include == ("*",) and quantization.exclude == ()
    assert quantization.per_channel is False and quantization.quantize_first is False
    assert quantization.momentum == 0.9 and quantization.iterations == 2


@pytest.mark.parametrize("arguments,message", [
    ({"act_bits": 0}, "act_bits=0 is not allowed; expected an integer in [1, 8] or a non-empty mapping "
                      "{layer pattern: such an integer}"),
    ({"act_bits": 9}, "act_bits=9 is not allowed; expected an integer in [1, 8]"),
    ({"act_bits": {}}, "act_bits={} is not allowed; expected an integer in [1, 8]"),
    ({"act_bits": {"fc*": True}}, "act_bits={'fc*': True} is not allowed"),
    ({"start_epoch": -1}, "start_epoch=-1 is not allowed; expected an integer >= 0"),
    ({"start_epoch": 1.0}, "start_epoch=1.0 is not allowed; expected an integer >= 0"),
    ({"momentum": 1}, "momentum=1 is not allowed; expected a number in [0, 1)"),
    ({"momentum": -0.1}, "momentum=-0.1 is not allowed; expected a number in [0, 1)"),
    ({"iterations": 0}, "iterations=0 is not allowed; expected an integer >= 1"),
    ({"unit": "batch"}, "unit='batch' is not allowed; expected one of ('epoch', 'step')"),
])
def test_bad_arguments_are_named_with_what_is_allowed(arguments, message):
    with pytest.raises(ValueError) as error:
        ActivationQuantization(**arguments)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("arguments", [{"act_bits": 1}, {"act_bits": 8}, {"act_bits": {"fc*": 3, "*": 1}},
                                       {"momentum": 0}, {"iterations": 1}, {"unit": "step", "start_epoch": 5}])
def test_edges_that_are_allowed(arguments):
    ActivationQuantization(**arguments)
