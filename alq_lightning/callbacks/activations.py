"""``ActivationQuantization``: multi-bit inputs for the Linear and Conv layers of any LightningModule."""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from ..activations import (
    CHECKPOINT_KEY,
    MAX_ACT_BITS,
    ActivationLayer,
    attach_activations,
    detach_activations,
    find_bypassed,
    is_quantizable_input,
)
from .arguments import check, is_int, is_number
from .init import ALQInit, refuse_twice
from .stages import UNITS


class ActivationQuantization(Callback):
    """Quantize the inputs of Linear and Conv layers into ``act_bits`` binary bases from ``start_epoch`` on
    (see :mod:`alq_lightning.activations`); with ``unit="step"`` the start counts optimizer steps.

    With an :class:`ALQInit` (or ``ALQCallback``) in the Trainer the layers are those whose weights ALQ
    quantizes; alone, every Linear and Conv matched by ``include``/``exclude`` (patterns over module names).
    The first layer's input (the raw image or embedding) stays float unless ``quantize_first``; the inputs of
    other modules (embeddings, attention) stay float, and so does the input of a Linear whose weight is read
    without calling it (the ``out_proj`` of ``nn.MultiheadAttention``): the log names them. A quantizer that no
    training batch fitted (its hook never ran) by the end of the first epoch with quantized inputs, by the end of
    the fit, or at an evaluation outside a fit is detached, named in a warning and not counted. The coordinates
    travel in checkpoints under ``"alq_activations"``; a model loaded without this callback computes with float
    activations. Evaluation (validate, test, predict) quantizes the input of each fitted quantizer. Under
    ``ModelParallelStrategy`` (FSDP2) the quantizers attach at the start of fitting, to the modules
    ``configure_model`` sharded; their coordinates are replicated on every process and averaged over them as under
    DDP.

    Args:
        act_bits: binary bases per input (1..8), or ``{layer name pattern: bases}`` (the first matching pattern
            decides; a layer matching none keeps a float input), e.g. ``{"fc*": 3, "*": 2}``.
        start_epoch: first epoch (or step) with quantized inputs; the first training batch then sets the codes
            ({0,1} for non-negative inputs, else ±1) and the coordinates.
        per_channel: one coordinate vector per input channel instead of one per layer.
        momentum: weight of the running coordinates against each batch's refit.
        iterations: alternating refit iterations per training batch.
    """

    def __init__(self, act_bits: int | Mapping[str, int] = 2, start_epoch: int = 0, include: Sequence[str] = ("*",),
                 exclude: Sequence[str] = (), per_channel: bool = False, quantize_first: bool = False,
                 momentum: float = 0.9, iterations: int = 2, unit: str = "epoch") -> None:
        per_layer = dict(act_bits) if isinstance(act_bits, Mapping) else {"*": act_bits}
        valid = all(isinstance(pattern, str) and is_int(bits) and 1 <= bits <= MAX_ACT_BITS
                    for pattern, bits in per_layer.items())
        check("act_bits", act_bits, bool(per_layer) and valid,
              f"an integer in [1, {MAX_ACT_BITS}] or a non-empty mapping {{layer pattern: such an integer}}")
        self.per_layer = per_layer
        check("start_epoch", start_epoch, is_int(start_epoch) and start_epoch >= 0, "an integer >= 0")
        check("momentum", momentum, is_number(momentum) and 0 <= momentum < 1, "a number in [0, 1)")
        check("iterations", iterations, is_int(iterations) and iterations >= 1, "an integer >= 1")
        check("unit", unit, unit in UNITS, f"one of {UNITS}")
        self.act_bits, self.start_epoch, self.unit = act_bits, start_epoch, unit
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.per_channel, self.quantize_first = per_channel, quantize_first
        self.momentum, self.iterations = float(momentum), iterations
        self.layers: dict[str, ActivationLayer] = {}
        self.reported: set[str] = set()
        self.dropped: dict[str, str] = {}  # layers detached because no training batch fitted them: why
        self.started = False  # whether a training batch of this fit ran with quantized inputs
        self.deferred = False  # the quantizers attach at the start of fitting (a model sharded in configure_model)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(act_bits=self.act_bits, start_epoch=self.start_epoch)

    def select(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """``({layer: module}, {name: why it stays float})``."""
        inits = [cb for cb in trainer.callbacks if isinstance(cb, ALQInit)]
        inits += [cb.init for cb in trainer.callbacks if isinstance(getattr(cb, "init", None), ALQInit)]
        if inits and inits[0].network is not None:
            named = {name: layer.module for name, layer in inits[0].network.layers.items()}
        else:
            named = {name: module for name, module in pl_module.named_modules()
                     if any(fnmatch.fnmatchcase(name, p) for p in self.include)
                     and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)}
        chosen, floats, first = {}, {}, not self.quantize_first
        bypassed = find_bypassed(pl_module)
        for name, module in named.items():
            if not is_quantizable_input(module):
                if inits:
                    floats[name] = f"{type(module).__name__} input"
            elif id(module) in bypassed:
                floats[name] = bypassed[id(module)]
            elif name in self.dropped:
                floats[name] = self.dropped[name]
            elif first:
                floats[name], first = "first layer's input (quantize_first=False)", False
            elif self.bits_of(name) is None:
                floats[name] = "no act_bits pattern matches"
            else:
                chosen[name] = module
        return chosen, floats

    def bits_of(self, name: str) -> int | None:
        """The input bases of layer ``name``: the first matching pattern's, or None."""
        return next((bits for pattern, bits in self.per_layer.items() if fnmatch.fnmatchcase(name, pattern)), None)

    def check_alone(self, trainer: Trainer) -> None:
        """Refuse a Trainer holding another ActivationQuantization (as a callback or inside an ALQCallback)."""
        refuse_twice(trainer, ActivationQuantization, "activations", "input quantizers",
                     "ALQCallback(act_bits=...) brings its own ActivationQuantization")

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_alone(trainer)
        for init in self.inits(trainer):  # ALQ attaches first, whatever the order of the callbacks
            init.setup(trainer, pl_module, stage)
        if stage == TrainerFn.FITTING:
            self.dropped, self.started = {}, False
        self.deferred = isinstance(trainer.strategy, ModelParallelStrategy) and stage == TrainerFn.FITTING
        if not self.deferred:
            self.attach(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Under ``ModelParallelStrategy`` attach now, to the modules ``configure_model`` sharded (after ALQ's
        sharded layers, which attach at the start of fitting too)."""
        if not self.deferred:
            return
        for init in self.inits(trainer):
            if init.network is None:
                init.on_fit_start(trainer, pl_module)
        self.deferred = False
        self.attach(trainer, pl_module)

    @staticmethod
    def inits(trainer: Trainer) -> list[ALQInit]:
        """The :class:`ALQInit` s of ``trainer`` (callbacks themselves, or an ``ALQCallback``'s ``init``)."""
        found = [callback if isinstance(callback, ALQInit) else getattr(callback, "init", None)
                 for callback in trainer.callbacks]
        return [init for init in found if isinstance(init, ALQInit)]

    def attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Select the layers (:meth:`select`) and attach their input quantizers."""
        chosen, floats = self.select(trainer, pl_module)
        if not chosen and not self.dropped:  # after a fit that dropped every quantizer, evaluation runs in float
            raise ValueError(f"ActivationQuantization found no Linear or Conv layer whose input it could quantize "
                             f"in {type(pl_module).__name__} (left in float: {floats or 'none'})")
        self.layers = {}
        for name, module in chosen.items():
            self.layers |= attach_activations({name: module}, self.bits_of(name), self.per_channel, self.momentum,
                                              self.iterations)
        left = ", ".join(f"{name} ({why})" for name, why in floats.items()) or "none"
        bits = ", ".join(f"{name} {layer.act_bits}" for name, layer in self.layers.items()) or "none"
        rank_zero_info(f"inputs quantized (bits): {bits}, from {self.unit} "
                       f"{self.start_epoch}; inputs left in float: {left}")

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Say which codes each quantizer took, once, after its first batch."""
        fresh = [layer for name, layer in self.layers.items() if name not in self.reported and layer.ready]
        if fresh:
            self.reported.update(layer.name for layer in fresh)
            rank_zero_info("input codes: " + ", ".join(
                f"{layer.name} {'±1 (negative inputs seen)' if layer.signed else '{0,1} (inputs never negative)'}"
                for layer in fresh))

    def _enable(self, enabled: bool) -> None:
        for layer in self.layers.values():
            layer.enabled = enabled

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        position = trainer.current_epoch if self.unit == "epoch" else trainer.global_step
        on = position >= self.start_epoch
        self.started |= on
        self._enable(on)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.started:
            self._drop_unfitted(f"no training batch of epoch {trainer.current_epoch} with quantized inputs reached its "
                                f"input hook (its weight is read without calling the module, or the module is unused)")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        why = ("no training batch with quantized inputs reached its input hook" if self.started else
               f"the fit ended before its inputs were quantized (from {self.unit} {self.start_epoch} on)")
        self._drop_unfitted(why)

    def _enable_fitted(self, trainer: Trainer | None = None, *args: Any) -> None:
        """Evaluation quantizes the input of each fitted quantizer; outside a fit, unfitted ones are dropped."""
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            self._drop_unfitted("not fitted: no training batch has reached it, and no checkpoint holds it")
        for layer in self.layers.values():
            layer.enabled = layer.ready

    on_validation_start = on_test_start = on_predict_start = _enable_fitted

    def _drop_unfitted(self, why: str) -> None:
        """Detach the quantizers that no training batch fitted, name them in a warning, and stop counting them."""
        unfitted = [name for name, layer in self.layers.items() if not layer.ready]
        for name in unfitted:
            detach_activations(self.layers.pop(name).module)
            self.dropped[name] = why
        if unfitted:
            rank_zero_warn(f"the inputs of {unfitted} stay float and are not counted: {why}")

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {name: layer.tensors() for name, layer in self.layers.items()}

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY, {})
        unknown = sorted(set(saved) - set(self.layers))
        if unknown:
            raise ValueError(f"the checkpoint holds activation quantizers of layers {unknown} that this model's "
                             f"ActivationQuantization does not have ({sorted(self.layers)})")
        for name, tensors in saved.items():
            self.layers[name].load(tensors)
