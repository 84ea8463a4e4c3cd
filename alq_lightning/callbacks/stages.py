"""The ALQ stages as Lightning callbacks, each active over a window of epochs (or of optimizer steps).

A stage consumes the quantized weights' gradients in ``on_before_optimizer_step`` (after accumulation,
all-reduce and AMP unscaling), updates the multi-bit state through :class:`~alq_lightning.network.MultiBitNetwork`
and writes ŵ back into the weights; the module's own optimizer never sees those gradients. Lightning clips
gradients only after that hook, so a stage calls the module's ``configure_gradient_clipping`` (with the
Trainer's ``gradient_clip_val``/``gradient_clip_algorithm``) itself first, over the same parameters; Lightning
calls it again afterwards on the gradients left. Layers without a gradient in a step are left as they are; a
step in which some quantized weight's gradient is not finite is skipped (decided on the device, so a step never
waits for it) and each stage reports its skipped steps at the end of the epoch. Every decision is a function of
the epoch and the optimizer step, so a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from ..core import step_budget
from ..layers import first_non_finite
from ..network import MultiBitNetwork
from .arguments import check, is_int, is_number
from .init import ALQInit, find_init

UNITS = ("epoch", "step")


def check_finite(trainer: Trainer, pl_module: LightningModule, when: str) -> None:
    """RuntimeError naming the first parameter or multi-bit coordinates of ``pl_module`` that is not finite, with the
    epoch and step (reads the device: for epoch ends and the end of the schedule, not for steps)."""
    broken = first_non_finite(pl_module)
    if broken is not None:
        raise RuntimeError(f"{broken} is not finite at epoch {trainer.current_epoch}, step {trainer.global_step}, "
                           f"{when}: a non-finite loss or update has reached the model; lower the learning rate, clip "
                           f"gradients, or find where the loss stops being finite")


class ALQStage(Callback, ABC):
    """A stage active for ``epochs`` units from ``start_epoch``, with learning rate ``lr · lr_decay^e`` in its
    ``e``-th unit. The unit is the epoch (``trainer.current_epoch``), or with ``unit="step"`` the optimizer step
    (``trainer.global_step``), for fits too short to give each stage an epoch (``fast_dev_run``, one epoch).
    Needs an :class:`ALQInit` (or :class:`ALQCallback`) in the same Trainer."""

    def __init__(self, start_epoch: int, epochs: int, lr: float = 1e-3, lr_decay: float = 1.0,
                 unit: str = "epoch") -> None:
        check("start_epoch", start_epoch, is_int(start_epoch) and start_epoch >= 0, "an integer >= 0")
        check("epochs", epochs, is_int(epochs) and epochs >= 1, "an integer >= 1")
        check("lr", lr, is_number(lr) and lr > 0, "a number > 0")
        check("lr_decay", lr_decay, is_number(lr_decay) and 0 < lr_decay <= 1, "a number in (0, 1]")
        check("unit", unit, unit in UNITS, f"one of {UNITS}")
        self.start_epoch, self.epochs, self.lr, self.lr_decay = start_epoch, epochs, float(lr), float(lr_decay)
        self.unit = unit
        self.init: ALQInit | None = None
        self.stepped = False
        self.reset()

    def reset(self) -> None:
        """Forget the progress of an earlier fit (the stage starts on a new model)."""

    @property
    def end_epoch(self) -> int:
        """First epoch after the window."""
        return self.start_epoch + self.epochs

    @property
    @override
    def state_key(self) -> str:
        unit = {"unit": self.unit} if self.unit != "epoch" else {}
        return self._generate_state_key(start_epoch=self.start_epoch, epochs=self.epochs, **unit)

    @property
    def network(self) -> MultiBitNetwork:
        return self.init.network

    def bind(self, init: ALQInit) -> None:
        self.init = init

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.init is None:
            self.init = find_init(trainer, self)
        self.init.register(self)

    def position(self, trainer: Trainer) -> int:
        """The current epoch, or optimizer step with ``unit="step"``."""
        return trainer.current_epoch if self.unit == "epoch" else trainer.global_step

    def active(self, trainer: Trainer) -> bool:
        return self.start_epoch <= self.position(trainer) < self.end_epoch

    def current_lr(self, trainer: Trainer) -> float:
        return self.lr * self.lr_decay ** (self.position(trainer) - self.start_epoch)

    def take_grads(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> frozenset[str]:
        """Clip the gradients as the module would, then move the quantized weights' gradients into the network;
        returns the layers that had one."""
        if pl_module.automatic_optimization:
            pl_module.configure_gradient_clipping(optimizer, gradient_clip_val=trainer.gradient_clip_val,
                                                  gradient_clip_algorithm=trainer.gradient_clip_algorithm)
        return self.network.take_grads()

    def step(self, trainer: Trainer, names: frozenset[str]) -> None:
        """This optimizer step's update of the layers ``names`` (their gradients are in the network)."""
        self.stepped = True
        self.apply(trainer, names)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.active(trainer):
            self.step(trainer, self.take_grads(trainer, pl_module, optimizer))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.stepped:
            return
        self.stepped = False
        skipped = self.network.skipped
        self.network.reset_skipped()
        if skipped:
            rank_zero_warn(f"{type(self).__name__}: skipped {skipped} ALQ update(s) in epoch {trainer.current_epoch}: "
                           f"a quantized weight's gradient was not finite")
            check_finite(trainer, pl_module, f"after {skipped} ALQ update(s) of this epoch were skipped for a "
                                             f"non-finite gradient (every later one would be)")

    @abstractmethod
    def apply(self, trainer: Trainer, names: frozenset[str]) -> None:
        """Update the multi-bit state of the layers ``names`` from the gradients gathered into the network."""


class BasisRefit(ALQStage):
    """Basis step every training step: nearest bases to the AMSGrad target, then a weighted coordinate refit."""

    def apply(self, trainer: Trainer, names: frozenset[str]) -> None:
        self.network.basis_step(names, self.current_lr(trainer))


class CoordinateRefit(ALQStage):
    """Coordinate step every training step: AMSGrad on the live coordinates with the bases fixed."""

    def apply(self, trainer: Trainer, names: frozenset[str]) -> None:
        self.network.coordinate_step(names, self.current_lr(trainer))


class STEFineTune(ALQStage):
    """Straight-through fine-tuning: latent float weights (starting at ŵ) take AMSGrad steps from the
    gradient at ŵ; bases and coordinates are refit to them after every step."""

    def __init__(self, start_epoch: int, epochs: int, lr: float = 1e-3, lr_decay: float = 0.95,
                 unit: str = "epoch") -> None:
        super().__init__(start_epoch, epochs, lr, lr_decay, unit)

    def reset(self) -> None:
        self.started = False

    def apply(self, trainer: Trainer, names: frozenset[str]) -> None:
        if not self.started:
            self.network.start_ste()
            self.started = True
        self.network.ste_step(names, self.current_lr(trainer))
        if self.unit == "step" and self.position(trainer) == self.end_epoch - 1:
            self.network.end_ste()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.started and self.unit == "epoch" and trainer.current_epoch == self.end_epoch - 1:
            self.network.end_ste()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.started = bool(state_dict["started"])


class BitwidthReduction(ALQStage):
    """Smooth pruning of the least important coordinates toward an average-bits budget.

    The budget path is geometric over ``rounds`` from the average after initialisation to ``target_bits``;
    this stage covers round ``round_index`` and spreads it evenly over every optimizer step of its window,
    ending at or below the round's budget by less than one slot's bits. Coordinates are not stepped; their
    statistics keep updating; normalisation layers use their running statistics.

    Args:
        target_bits: final average bitwidth of the whole schedule.
        rounds / round_index: this window is round ``round_index`` of ``rounds`` (default: the only one).
        per_bit: rank slots by loss increase per bit saved instead of per slot.
    """

    def __init__(self, start_epoch: int, target_bits: float, epochs: int = 1, rounds: int = 1,
                 round_index: int = 1, lr: float = 1e-3, lr_decay: float = 1.0, per_bit: bool = False,
                 unit: str = "epoch") -> None:
        super().__init__(start_epoch, epochs, lr, lr_decay, unit)
        check("target_bits", target_bits, is_number(target_bits) and target_bits > 0, "a number > 0")
        check("rounds", rounds, is_int(rounds) and rounds >= 1, "an integer >= 1")
        check("round_index", round_index, is_int(round_index) and 1 <= round_index <= rounds,
               f"an integer in [1, rounds={rounds}]")
        self.target_bits, self.rounds, self.round_index = float(target_bits), rounds, round_index
        self.per_bit = per_bit

    def reset(self) -> None:
        self.window_start_step: int | None = None
        self._frozen_norms: list[nn.Module] = []
        self._reported: set[str] = set()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.network is None:  # a sharded model attaches at fit start, which sets the stages up again
            return
        max_bits = max(layer.state.max_bits for layer in self.network.layers.values())
        check("target_bits", self.target_bits, self.target_bits < max_bits, f"a number in (0, max_bits={max_bits})")

    def steps_per_epoch(self, trainer: Trainer) -> int:
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(f"{type(self).__name__} spreads pruning over the optimizer steps of an epoch, so the "
                             f"training dataloader needs a length (num_training_batches={batches})")
        return math.ceil(batches / trainer.accumulate_grad_batches)

    def window_steps(self, trainer: Trainer) -> int:
        """Optimizer steps in the window."""
        return self.epochs * self.steps_per_epoch(trainer) if self.unit == "epoch" else self.epochs

    def budget(self, trainer: Trainer, step: int) -> float:
        """Average-bits budget after window step ``step``."""
        return step_budget(self.network.initial_bits, self.target_bits, self.round_index, self.rounds,
                           step, self.window_steps(trainer))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.active(trainer):
            self._frozen_norms = [m for m in pl_module.modules()
                                  if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
            for module in self._frozen_norms:
                module.eval()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for module in self._frozen_norms:
            module.train()
        self._frozen_norms = []

    def apply(self, trainer: Trainer, names: frozenset[str]) -> None:
        if self.window_start_step is None:
            self.window_start_step = trainer.global_step
        self.network.observe(names)
        step = min(trainer.global_step - self.window_start_step, self.window_steps(trainer) - 1)
        budget = self.budget(trainer, step)
        excess = self.network.binary_bits - budget * self.network.numel
        if excess <= 0:
            return
        self._check_stats()
        self.prune(excess, self.current_lr(trainer))
        if self.network.binary_bits > budget * self.network.numel:
            blamed = self.network.without_stats()
            raise RuntimeError(
                f"{type(self).__name__} cannot reach {budget:.4f} average bits at step {trainer.global_step}: "
                f"every prunable slot is gone and the layers that never received a gradient, {blamed}, hold "
                f"{sum(self.network.layers[n].bits.binary_bits for n in blamed)} of the "
                f"{self.network.binary_bits} bits left; make them take part in the loss or leave them in float "
                f"(exclude=[...])"
            )

    def _check_stats(self) -> None:
        """Refuse frozen quantized layers; warn once about layers without a gradient so far (not ranked)."""
        missing = [name for name in self.network.without_stats() if name not in self._reported]
        frozen = [name for name in missing if not self.network.layers[name].param.requires_grad]
        if frozen:
            raise ValueError(
                f"quantized layers {frozen} have weights with requires_grad=False and never received a gradient, "
                f"so ALQ cannot rank their bits; unfreeze them before this pruning window or leave them in float"
            )
        if missing:
            self._reported.update(missing)
            rank_zero_warn(f"{type(self).__name__}: layers {missing} have not received a gradient yet; they keep "
                           f"their bits while the other layers are pruned")

    def prune(self, bits: float, lr: float) -> int:
        return self.network.prune_slots(bits, lr, self.per_bit)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"window_start_step": self.window_start_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.window_start_step = state_dict["window_start_step"]


class GroupPruning(BitwidthReduction):
    """Like :class:`BitwidthReduction`, but removes whole groups (all their live slots), ranked by the
    modelled loss increase per bit saved, within the same bit budget."""

    def prune(self, bits: float, lr: float) -> int:
        return self.network.prune_groups(bits, lr)
