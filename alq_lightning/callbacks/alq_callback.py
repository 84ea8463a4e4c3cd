"""``ALQCallback``: the whole ALQ pipeline on any LightningModule."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ..core import PAPER_SCHEDULE, check_target_bits, fit_schedule, schedule_epochs
from ..network import MultiBitNetwork
from .activations import ActivationQuantization
from .arguments import check, is_int
from .init import CHECKPOINT_KEY, ALQInit
from .progress import show_in_bar, stage_labels
from .stages import ALQStage, BasisRefit, BitwidthReduction, CoordinateRefit, GroupPruning, STEFineTune, check_finite

PRUNING = {"coordinates": BitwidthReduction, "groups": GroupPruning}
ACT_STARTS = ("ste", "start")
LIGHTNING_MAX_EPOCHS = 1000  # what Lightning sets when neither max_epochs nor max_steps is given
DEV_SCHEDULE = {"rounds": 1, "basis_epochs": 1, "coordinate_epochs": 1, "pruning_epochs": 1, "ste_epochs": 1,
                "final_coordinate_epochs": 1}


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
    scaled into ``max_epochs - start_epoch`` (:func:`~alq_lightning.core.fit_schedule`). Given ones are kept as
    they are, the others take the paper's values, and a Trainer too short for them is refused. The schedule is
    logged at setup; under Lightning's default ``max_epochs`` the fit takes the schedule's length. Each stage is
    named in the log as it starts and in the progress bar (:meth:`progress`) with the average bits.
    A fitted schedule that finds fewer than 2 epochs (``max_epochs=1``, or only ``max_steps``) is laid over the
    fit's optimizer steps instead (:attr:`unit` ``"step"``). Under ``fast_dev_run=n`` every stage runs for one
    step whatever the schedule (stages share a step when ``n < 5``), ending at ``target_bits``. A fit that ends
    before the schedule does (``max_steps``, early stopping) says so at its end.

    Paper defaults (Qu et al., 2020): ``max_bits=6`` (ResNets 8), ``rounds=5`` (LeNet5 4), basis/coordinate
    epochs 20/10 (ResNets 10/5), one pruning epoch, ``ste_epochs=50`` (ResNets 80), 20 final coordinate
    epochs, ``lr=1e-3`` (ResNets 2e-4), ``lr_decay=0.8``.

    Args:
        target_bits: average bits per quantized weight at the end, in ``(0, max_bits)``; by default 1 (a binary
            network on average, with bits spent where the loss needs them).
        pruning: ``"coordinates"`` (ALQ's bitwidth reduction, one slot at a time) or ``"groups"``
            (whole groups, ranked by loss increase per bit saved).
        per_bit: rank coordinates by loss increase per bit saved (only with ``pruning="coordinates"``).
        act_bits: quantize the inputs of the quantized Linear/Conv layers into this many binary bases, or
            ``{layer pattern: bases}`` (:class:`ActivationQuantization`), from ``act_start``: ``"start"`` (the
            first ALQ epoch, so that the bases are found for the quantized inputs they will meet; measured
            better than ``"ste"`` with 2-bit inputs on the LeNet5 protocol and the default job) or ``"ste"`` (the
            STE stage on); None keeps activations float.
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
        act_bits: int | Mapping[str, int] | None = None,
        act_start: str = "start",
    ) -> None:
        check("act_start", act_start, act_start in ACT_STARTS, f"one of {ACT_STARTS}")
        self.activations = None if act_bits is None else ActivationQuantization(act_bits)
        self.act_start = act_start
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
        self.over_steps, self.restored = False, None
        self.bits: float | None = None
        self.given = {**PAPER_SCHEDULE, **given}
        self._build(self.given)

    @classmethod
    def paper(cls, target_bits: float = 1.0, **kwargs: Any) -> ALQCallback:
        """The paper's 225-epoch schedule (:data:`~alq_lightning.core.PAPER_SCHEDULE`) kept whatever the Trainer:
        a Trainer with fewer than ``total_epochs`` epochs is refused, not fitted. ``kwargs`` are the other
        arguments (a schedule argument among them replaces the paper's value)."""
        return cls(target_bits, **{**PAPER_SCHEDULE, **kwargs})

    def _build(self, schedule: dict[str, int], unit: str = "epoch", steps: int | None = None) -> None:
        """The stages of ``schedule`` (the keys of :data:`~alq_lightning.core.PAPER_SCHEDULE`) from ``start_epoch``,
        in ``unit``s; with ``steps``, windows beyond the fit's last step move onto it (so they share it)."""
        lr, lr_decay, ste_lr, ste_lr_decay, final_lr, final_lr_decay = self.rates
        basis_epochs, coordinate_epochs = schedule["basis_epochs"], schedule["coordinate_epochs"]
        rounds, pruning_epochs = schedule["rounds"], schedule["pruning_epochs"]
        self.schedule, self.unit = dict(schedule), unit
        last = self.start_epoch + schedule_epochs(schedule) if steps is None else steps - 1
        self.stages: list[ALQStage] = []
        epoch = self.start_epoch
        for round_index in range(1, rounds + 1):
            self._add(BasisRefit, min(epoch, last), basis_epochs, lr, lr_decay)
            self._add(CoordinateRefit, min(epoch + basis_epochs, last), coordinate_epochs,
                      lr * lr_decay**basis_epochs, lr_decay)
            epoch += basis_epochs + coordinate_epochs
            self.stages.append(PRUNING[self.pruning](
                min(epoch, last), self.target_bits, pruning_epochs, rounds, round_index,
                lr * lr_decay ** (basis_epochs + coordinate_epochs), lr_decay, self.per_bit, unit,
            ))
            epoch += pruning_epochs
        ste_epochs = schedule["ste_epochs"]
        self._add(STEFineTune, min(epoch, last), ste_epochs, ste_lr, ste_lr_decay)
        epoch += ste_epochs
        final_lr = ste_lr * ste_lr_decay**ste_epochs if final_lr is None else final_lr
        self._add(CoordinateRefit, min(epoch, last), schedule["final_coordinate_epochs"], final_lr, final_lr_decay)
        self.total_epochs = min(epoch + schedule["final_coordinate_epochs"], last + 1)
        if self.activations is not None:
            ste = min(epoch - ste_epochs, last)
            self.activations.start_epoch = self.start_epoch if self.act_start == "start" else ste
            self.activations.unit = unit
        self.init.stages = []
        for stage in self.stages:
            stage.bind(self.init)

    def _add(self, kind: type[ALQStage], start: int, epochs: int, lr: float, lr_decay: float) -> None:
        if epochs:
            self.stages.append(kind(start, epochs, lr, lr_decay, unit=self.unit))

    def describe(self) -> str:
        """The schedule in words, e.g. ``"2 rounds × (2 basis + 1 coordinate + 1 pruning), 2 STE, 0 final
        coordinate epochs (10 in all)"`` (``steps`` when laid over optimizer steps)."""
        s = self.schedule
        return (f"{s['rounds']} round{'s' * (s['rounds'] != 1)} × ({s['basis_epochs']} basis + "
                f"{s['coordinate_epochs']} coordinate + {s['pruning_epochs']} pruning), {s['ste_epochs']} STE, "
                f"{s['final_coordinate_epochs']} final coordinate {self.unit}s ({self.total_epochs - self.start_epoch}"
                f" in all)")

    @property
    @override
    def state_key(self) -> str:
        """Keyed by target and schedule length (by ``unit="step"`` for a schedule laid over the fit's steps, whose
        length is known only once training starts, after a checkpoint's state is restored)."""
        length = {"unit": "step"} if self.over_steps else {"total_epochs": self.total_epochs}
        acts = {} if self.activations is None else {"act_bits": self.activations.act_bits}
        return self._generate_state_key(target_bits=self.target_bits, **length, **acts)

    @property
    def network(self) -> MultiBitNetwork | None:
        return self.init.network

    def _each(self, hook: str, *args: Any) -> None:
        for callback in (self.init, *self.stages, *([self.activations] if self.activations else [])):
            getattr(callback, hook)(*args)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.activations is not None:
            self.activations.on_validation_start(trainer, pl_module)

    on_test_start = on_predict_start = on_validation_start

    def position(self, trainer: Trainer) -> int:
        """Units of the schedule done: epochs, or optimizer steps when :attr:`unit` is ``"step"``."""
        return trainer.current_epoch if self.unit == "epoch" else trainer.global_step

    def stage_at(self, position: int) -> ALQStage | None:
        return next((s for s in self.stages if s.start_epoch <= position < s.end_epoch), None)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fit(trainer)
            show_in_bar(trainer, self, self.progress)
        alone = next((callback for callback in trainer.callbacks if isinstance(callback, ALQStage)), None)
        if alone is not None:  # whatever the order of the callbacks: a stage alone attaches nothing
            raise ValueError(f"{type(alone).__name__} would step the layers of {self.state_key} beside that "
                             f"callback's own stages: use stages with one ALQInit, or {type(self).__name__} alone")
        if self.activations is not None:
            self.activations.check_alone(trainer)
        self._each("setup", trainer, pl_module, stage)

    def _fit(self, trainer: Trainer) -> None:
        """Fit the schedule to this Trainer (see the class docstring), or refuse one that cannot hold it. A schedule
        over optimizer steps is laid at ``on_train_start``: counting the steps loads the training data, which
        before then would lose a resumed loader's position."""
        max_epochs = trainer.max_epochs
        bounded = max_epochs is not None and max_epochs >= 0
        short = max_epochs - self.start_epoch < 2 if bounded else trainer.max_steps != -1
        self.over_steps = bool(trainer.fast_dev_run) or (self.fits_trainer and short)
        if self.over_steps and not trainer.fast_dev_run and self.start_epoch:
            raise ValueError(f"Trainer(max_epochs={max_epochs}) leaves {max(max_epochs - self.start_epoch, 0)} epochs "
                             f"after start_epoch={self.start_epoch}; an ALQ schedule needs at least 2 (one basis, one "
                             f"pruning epoch)")
        if self.over_steps:
            return
        fitted = self.fits_trainer and bounded
        schedule = fit_schedule(max_epochs - self.start_epoch) if fitted else self.given
        if (schedule, "epoch") != (self.schedule, self.unit):
            self._build(schedule)
        if bounded and max_epochs < self.total_epochs:
            raise ValueError(
                f"Trainer(max_epochs={max_epochs}) cannot hold the ALQ schedule of {self.total_epochs} epochs; "
                f"set Trainer(max_epochs={self.total_epochs}) (see ALQCallback(...).total_epochs)"
            )
        default = max_epochs == LIGHTNING_MAX_EPOCHS and trainer.max_steps == -1
        if default:  # Lightning's default: the fit (and its progress bar) takes the schedule's length instead
            trainer.fit_loop.max_epochs = self.total_epochs
        origin = "" if default or not fitted else f" fitted into Trainer(max_epochs={max_epochs})"
        ending = (f"; the fit ends with it after epoch {self.total_epochs - 1} (Trainer(max_epochs) was Lightning's "
                  "default)") if default else ""
        rank_zero_info(f"ALQ schedule{origin}: {self.describe()}, to {self.target_bits:g} average bits{ending}")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.over_steps:
            return
        steps = trainer.estimated_stepping_batches
        if trainer.fast_dev_run:
            self._build(DEV_SCHEDULE, "step", int(steps))
            rank_zero_info(f"ALQ under fast_dev_run: every stage runs for one step: {self.describe()}")
        else:
            if not 2 <= steps < float("inf"):
                raise ValueError(
                    f"Trainer(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}) gives {steps} optimizer "
                    f"steps; an ALQ schedule needs at least 2 epochs, or 2 steps within one (one basis, one pruning "
                    f"step)")
            self._build(fit_schedule(int(steps)), "step")
            rank_zero_info(f"ALQ schedule fitted into the {steps} optimizer steps of this fit: {self.describe()}")
        for stage in self.stages:
            stage.setup(trainer, pl_module, "fit")
        if self.restored is not None:
            self._load_stages(self.restored)
            self.restored = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._each("on_fit_start", trainer, pl_module)
        self.bits = self.network.avg_bits

    def labelled(self) -> list[tuple[ALQStage, str]]:
        """Each stage with its name in the log and the progress bar (:func:`~.progress.stage_labels`)."""
        return stage_labels(self.stages, self.schedule["rounds"])

    def progress(self, trainer: Trainer) -> dict[str, str]:
        """What the progress bar shows beside the module's metrics: the stage at this epoch (or step) and the
        average bits at the last epoch end (read there, so that no step waits for the device)."""
        position = self.position(trainer)
        label = next((name for stage, name in self.labelled() if stage.start_epoch <= position < stage.end_epoch),
                     "done" if position >= self.total_epochs else "")
        return {"alq": label, "bits": f"{self.bits:.3f}"} if self.bits is not None else {}

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Name each stage as it starts (epoch schedules; a schedule over steps is stated at its start)."""
        if self.unit != "epoch":
            return
        for stage, label in self.labelled():
            if stage.start_epoch == trainer.current_epoch:
                rank_zero_info(f"ALQ {label}: epochs {stage.start_epoch}-{stage.end_epoch - 1} of "
                               f"{self.total_epochs}, from {self.bits:.3f} average bits")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._each("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._each("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)
        if self.unit == "step" and trainer.global_step >= self.total_epochs:
            self._complete(trainer)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Every stage active at this step updates from the one set of gradients, in schedule order."""
        self.init.on_before_optimizer_step(trainer, pl_module, optimizer)
        active = [stage for stage in self.stages if stage.active(trainer)]
        if active:
            names = active[0].take_grads(trainer, pl_module, optimizer)
            for stage in active:
                stage.step(trainer, names)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log bits, round and learning rate; stop fitting once the schedule is complete."""
        self._each("on_train_epoch_end", trainer, pl_module)
        self.bits = self.network.avg_bits
        done = self.position(trainer) + (self.unit == "epoch")
        stage = self.stage_at(done - 1)
        rounds = sum(s.end_epoch <= done for s in self.stages if isinstance(s, BitwidthReduction))
        pl_module.log_dict({"alq/round": float(rounds), "alq/lr": stage.current_lr(trainer) if stage else 0.0},
                           rank_zero_only=True)
        if self.unit == "epoch" and done >= self.total_epochs:
            self._complete(trainer)

    def _complete(self, trainer: Trainer) -> None:
        if trainer.should_stop:
            return
        check_finite(trainer, trainer.lightning_module, "at the end of the ALQ schedule, which a model that is not "
                                                        "finite does not complete")
        self._check_target()
        rank_zero_info(f"ALQ schedule complete after {self.total_epochs} {self.unit}s at "
                       f"{self.network.avg_bits:.4f} average bits; stopping the fit")
        trainer.should_stop = True

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Say so when the fit ended before the schedule did (the model may not be at ``target_bits``)."""
        if self.activations is not None:
            self.activations.on_train_end(trainer, pl_module)
        if self.position(trainer) < self.total_epochs or self.network.avg_bits > self.target_bits + 1e-9:
            rank_zero_warn(
                f"the fit ended at epoch {trainer.current_epoch}, step {trainer.global_step}, before the ALQ schedule "
                f"of {self.total_epochs} {self.unit}s was complete: the model holds {self.network.avg_bits:.4f} "
                f"average bits, not target_bits={self.target_bits:g}; let the Trainer run the whole schedule "
                f"(max_epochs/max_steps, early stopping)")

    def _check_target(self) -> None:
        """Never report completion above ``target_bits``."""
        reached = self.network.avg_bits
        if reached > self.target_bits + 1e-9:
            raise RuntimeError(
                f"the ALQ schedule ended at {reached:.4f} average bits, above target_bits={self.target_bits:g}; "
                f"layers that never received a gradient: {self.network.without_stats() or 'none'}"
            )

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._each("on_save_checkpoint", trainer, pl_module, checkpoint)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose ALQ schedule state was written by another configuration (Lightning would
        skip it, and the run would start ALQ afresh from weights that are already quantized)."""
        written = [key for key in checkpoint.get("callbacks", {}) if key.startswith(type(self).__name__)]
        if CHECKPOINT_KEY in checkpoint and self.state_key not in written:
            raise ValueError(f"the checkpoint's ALQ state was written by {written or 'no ALQCallback'}, not by this "
                             f"{self.state_key}: resume with the target_bits and schedule it was written with")
        self._each("on_load_checkpoint", trainer, pl_module, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"init": self.init.state_dict(), "stages": [stage.state_dict() for stage in self.stages]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.init.load_state_dict(state_dict["init"])
        if self.over_steps:
            self.restored = state_dict["stages"]  # for the stages laid at on_train_start
        else:
            self._load_stages(state_dict["stages"])

    def _load_stages(self, states: list[dict[str, Any]]) -> None:
        for stage, state in zip(self.stages, states, strict=True):
            stage.load_state_dict(state)

