"""``ALQCallback``: the whole ALQ pipeline on any LightningModule."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ..core import PAPER_SCHEDULE, check_target_bits, fit_schedule, schedule_epochs
from ..network import MultiBitNetwork
from .arguments import check, is_int
from .init import ALQInit
from .stages import ALQStage, BasisRefit, BitwidthReduction, CoordinateRefit, GroupPruning, STEFineTune

PRUNING = {"coordinates": BitwidthReduction, "groups": GroupPruning}


class ALQCallback(Callback):
    """Adaptive Loss-aware Quantization of a LightningModule to an average of ``target_bits`` bits per weight.

    Schedule (epochs, from ``start_epoch``)::

        init (structured sketching)
        rounds × [basis_epochs of BasisRefit, coordinate_epochs of CoordinateRefit, pruning_epochs of pruning]
        ste_epochs of STEFineTune, then final_coordinate_epochs of CoordinateRefit

    Within a round the learning rate restarts at ``lr`` and decays by ``lr_decay`` per epoch through basis,
    coordinate and pruning epochs; STE starts at ``ste_lr`` decaying by ``ste_lr_decay``; the final
    coordinate epochs continue from where STE ended (or start at ``final_lr``) decaying by ``final_lr_decay``.
    The bit budget follows a geometric path from the initial average to ``target_bits`` over the rounds
    and ends at or below it by less than one slot's bits.

    When none of ``rounds``, ``basis_epochs``, ``coordinate_epochs``, ``pruning_epochs``, ``ste_epochs`` and
    ``final_coordinate_epochs`` is given, the schedule fits the Trainer: the paper's 225 epochs (5 × (20 + 10 +
    1) + 50 + 20) when ``max_epochs`` holds them (Lightning's default 1000 does), else the paper's proportions
    scaled into ``max_epochs - start_epoch`` (:func:`~alq_lightning.core.fit_schedule`), logged at setup. Given
    ones are kept as they are, the others take the paper's values, and a Trainer too short for them is refused.

    Paper defaults (Qu et al., 2020): ``max_bits=6`` (ResNets 8), ``rounds=5`` (LeNet5 4), basis/coordinate
    epochs 20/10 (ResNets 10/5), one pruning epoch, ``ste_epochs=50`` (ResNets 80), 20 final coordinate
    epochs, ``lr=1e-3`` (ResNets 2e-4), ``lr_decay=0.8``.

    Args:
        target_bits: average bits per quantized weight at the end, in ``(0, max_bits)``; by default 1 (a binary
            network on average, with bits spent where the loss needs them).
        pruning: ``"coordinates"`` (ALQ's bitwidth reduction, one slot at a time) or ``"groups"``
            (whole groups, ranked by loss increase per bit saved).
        per_bit: rank coordinates by loss increase per bit saved (only with ``pruning="coordinates"``).
        max_bits, structures, include, exclude, types, max_bits_overrides, keep_first, keep_last, beta1,
            beta2, eps, compile: see :class:`ALQInit`.
    """

    def __init__(
        self,
        target_bits: float = 1.0,
        max_bits: int = 6,
        rounds: int | None = None,
        basis_epochs: int | None = None,
        coordinate_epochs: int | None = None,
        pruning_epochs: int | None = None,
        ste_epochs: int | None = None,
        final_coordinate_epochs: int | None = None,
        lr: float = 1e-3,
        lr_decay: float = 0.8,
        ste_lr: float = 1e-3,
        ste_lr_decay: float = 0.95,
        final_lr: float | None = None,
        final_lr_decay: float = 0.9,
        pruning: str = "coordinates",
        per_bit: bool = False,
        start_epoch: int = 0,
        structures: Mapping[str, str] | None = None,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        types: Sequence[str] | None = None,
        max_bits_overrides: Mapping[str, int] | None = None,
        keep_first: bool = False,
        keep_last: bool = False,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        compile: bool = False,
    ) -> None:
        self.init = ALQInit(max_bits, structures, include, exclude, types, max_bits_overrides,
                            keep_first, keep_last, beta1, beta2, eps, compile)
        widest = max([max_bits, *(max_bits_overrides or {}).values()])
        self.target_bits = check_target_bits(target_bits, widest)
        given = {name: value for name, value in (
            ("rounds", rounds), ("basis_epochs", basis_epochs), ("coordinate_epochs", coordinate_epochs),
            ("pruning_epochs", pruning_epochs), ("ste_epochs", ste_epochs),
            ("final_coordinate_epochs", final_coordinate_epochs)) if value is not None}
        for name, value in (*given.items(), ("start_epoch", start_epoch)):
            low = 1 if name in ("rounds", "pruning_epochs") else 0
            check(name, value, is_int(value) and value >= low, f"an integer >= {low}")
        check("pruning", pruning, pruning in PRUNING, f"one of {sorted(PRUNING)}")
        check("per_bit", per_bit, not (per_bit and pruning == "groups"),
               "False with pruning='groups' (groups are always ranked per bit)")
        self.fits_trainer = not given
        self.rates = (lr, lr_decay, ste_lr, ste_lr_decay, final_lr, final_lr_decay)
        self.pruning, self.per_bit, self.start_epoch = pruning, per_bit, start_epoch
        self._build({**PAPER_SCHEDULE, **given})

    def _build(self, schedule: dict[str, int]) -> None:
        """The stages of ``schedule`` (the keys of :data:`~alq_lightning.core.PAPER_SCHEDULE`) from ``start_epoch``."""
        lr, lr_decay, ste_lr, ste_lr_decay, final_lr, final_lr_decay = self.rates
        basis_epochs, coordinate_epochs = schedule["basis_epochs"], schedule["coordinate_epochs"]
        rounds, pruning_epochs = schedule["rounds"], schedule["pruning_epochs"]
        self.schedule = dict(schedule)
        self.stages: list[ALQStage] = []
        epoch = self.start_epoch
        for round_index in range(1, rounds + 1):
            self._add(BasisRefit, epoch, basis_epochs, lr, lr_decay)
            self._add(CoordinateRefit, epoch + basis_epochs, coordinate_epochs, lr * lr_decay**basis_epochs, lr_decay)
            epoch += basis_epochs + coordinate_epochs
            self.stages.append(PRUNING[self.pruning](
                epoch, self.target_bits, pruning_epochs, rounds, round_index,
                lr * lr_decay ** (basis_epochs + coordinate_epochs), lr_decay, self.per_bit,
            ))
            epoch += pruning_epochs
        ste_epochs = schedule["ste_epochs"]
        self._add(STEFineTune, epoch, ste_epochs, ste_lr, ste_lr_decay)
        epoch += ste_epochs
        final_lr = ste_lr * ste_lr_decay**ste_epochs if final_lr is None else final_lr
        self._add(CoordinateRefit, epoch, schedule["final_coordinate_epochs"], final_lr, final_lr_decay)
        self.total_epochs = epoch + schedule["final_coordinate_epochs"]
        self.init.stages = []
        for stage in self.stages:
            stage.bind(self.init)

    def _add(self, kind: type[ALQStage], start: int, epochs: int, lr: float, lr_decay: float) -> None:
        if epochs:
            self.stages.append(kind(start, epochs, lr, lr_decay))

    def describe(self) -> str:
        """The schedule in words, e.g. ``"2 rounds × (2 basis + 1 coordinate + 1 pruning), 2 STE, 0 final
        coordinate epochs (10 in all)"``."""
        s = self.schedule
        return (f"{s['rounds']} round{'s' * (s['rounds'] != 1)} × ({s['basis_epochs']} basis + "
                f"{s['coordinate_epochs']} coordinate + {s['pruning_epochs']} pruning), {s['ste_epochs']} STE, "
                f"{s['final_coordinate_epochs']} final coordinate epochs ({schedule_epochs(s)} in all)")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_bits=self.target_bits, total_epochs=self.total_epochs)

    @property
    def network(self) -> MultiBitNetwork | None:
        return self.init.network

    def _each(self, hook: str, *args: Any) -> None:
        for callback in (self.init, *self.stages):
            getattr(callback, hook)(*args)

    def stage_at(self, epoch: int) -> ALQStage | None:
        return next((s for s in self.stages if s.start_epoch <= epoch < s.end_epoch), None)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        max_epochs = trainer.max_epochs
        if stage == "fit" and self.fits_trainer and max_epochs is not None and max_epochs >= 0:
            available = max_epochs - self.start_epoch
            if available < 2:
                raise ValueError(f"Trainer(max_epochs={max_epochs}) leaves {available} epochs after start_epoch="
                                 f"{self.start_epoch}; an ALQ schedule needs at least 2 (one basis, one pruning epoch)")
            schedule = fit_schedule(available)
            if schedule != self.schedule:
                self._build(schedule)
                rank_zero_info(f"ALQ schedule fitted into Trainer(max_epochs={max_epochs}): {self.describe()}")
        if stage == "fit" and max_epochs is not None and 0 <= max_epochs < self.total_epochs:
            raise ValueError(
                f"Trainer(max_epochs={max_epochs}) cannot hold the ALQ schedule of {self.total_epochs} epochs; "
                f"set Trainer(max_epochs={self.total_epochs}) (see ALQCallback(...).total_epochs)"
            )
        self._each("setup", trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._each("on_fit_start", trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._each("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._each("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._each("on_before_optimizer_step", trainer, pl_module, optimizer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log bits, round and learning rate; stop fitting once the schedule is complete."""
        self._each("on_train_epoch_end", trainer, pl_module)
        stage = self.stage_at(trainer.current_epoch)
        rounds = [s for s in self.stages if isinstance(s, BitwidthReduction)]
        done = sum(s.end_epoch <= trainer.current_epoch + 1 for s in rounds)
        pl_module.log_dict({"alq/round": float(done), "alq/lr": stage.current_lr(trainer) if stage else 0.0},
                           rank_zero_only=True)
        if trainer.current_epoch + 1 >= self.total_epochs and not trainer.should_stop:
            self._check_target()
            rank_zero_info(f"ALQ schedule complete after {self.total_epochs} epochs at "
                           f"{self.network.avg_bits:.4f} average bits; stopping the fit")
            trainer.should_stop = True

    def _check_target(self) -> None:
        """Never report completion above ``target_bits``."""
        reached = self.network.avg_bits
        if reached > self.target_bits + 1e-9:
            raise RuntimeError(
                f"the ALQ schedule ended at {reached:.4f} average bits, above target_bits={self.target_bits:g}; "
                f"layers that never received a gradient: {self.network.without_stats() or 'none'}"
            )

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._each("on_save_checkpoint", trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._each("on_load_checkpoint", trainer, pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {"init": self.init.state_dict(), "stages": [stage.state_dict() for stage in self.stages]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.init.load_state_dict(state_dict["init"])
        for stage, state in zip(self.stages, state_dict["stages"], strict=True):
            stage.load_state_dict(state)

