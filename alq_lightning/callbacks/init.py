"""``ALQInit``: attach multi-bit state in ``setup`` and initialise it by structured sketching."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from ..core import QuadraticConfig
from ..layers import LayerSelection, attach
from ..network import MultiBitNetwork
from ..sharded import SHARDED_KEY, ShardedNetwork, attach_network, hold_optimizer_state
from ..summary import bit_summary
from .arguments import check

CHECKPOINT_KEY = "alq"
STRUCTURES_KEY = "alq_structures"  # {layer: structure}; older checkpoints lack it
_REFUSED_STRATEGIES = ("FSDP", "DeepSpeed")


class ALQInit(Callback):
    """Quantize the weight parameters of any LightningModule into multi-bit form.

    In ``setup`` the layers get fixed-shape multi-bit buffers (before DDP wraps the model and before a
    checkpoint is restored); at the start of fitting each layer is initialised from its float weight by
    structured sketching, unless a checkpoint already carried the state. The multi-bit tensors travel in
    the checkpoint under ``"alq"`` and each layer's structure under ``"alq_structures"`` (a checkpoint that lays
    a layer's groups out otherwise is refused); the weights in ``state_dict`` stay dense and equal to ŵ.

    Under ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``, which runs after ``setup``) each
    process holds the state of its own weight shard, attached at the start of fitting (:mod:`alq_lightning.sharded`).

    Outside every stage window the quantized weights are frozen (their gradients are dropped), while the
    module's own optimizer keeps training every other parameter. Frozen weights (``requires_grad=False`` at
    setup) stay in float unless ``include`` names their layer exactly; a Parameter shared by several modules
    is quantized once. Set up for a different module, the callback starts afresh on it.

    Args:
        max_bits: binary bases per group (1..8).
        structures: ``{name pattern: structure}``, e.g. ``{"conv1": "kernelwise", "fc*": "subchannelwise(2)"}``;
            unmatched layers use the automatic choice.
        include / exclude: patterns over layer names or fully qualified parameter names (default: every
            floating-point parameter with two or more dimensions: Linear/Conv weights, attention projections,
            embeddings, raw Parameters; see :mod:`alq_lightning.layers`).
        types: module class names whose parameters may be quantized (default: any).
        max_bits_overrides: ``{name pattern: max_bits}``.
        keep_first / keep_last: leave the first / last quantizable layer in float.
        beta1 / beta2 / eps: AMSGrad constants of the quadratic model.
        compile: run each step through ``torch.compile`` (on CUDA replayed as a CUDA graph); the first step of
            each kind compiles (seconds; a C++ compiler is needed on CPU) and the result equals the eager step up
            to float rounding.
    """

    def __init__(
        self,
        max_bits: int = 6,
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
        check("compile", compile, isinstance(compile, bool), "True or False")
        self.compile = compile
        self.selection = LayerSelection(
            max_bits=max_bits, include=tuple(include), exclude=tuple(exclude),
            types=None if types is None else tuple(types),
            structures=dict(structures or {}), max_bits_overrides=dict(max_bits_overrides or {}),
            keep_first=keep_first, keep_last=keep_last,
        )
        self.config = QuadraticConfig(beta1, beta2, eps)
        self.network: MultiBitNetwork | None = None
        self.sharded = False
        self.optimizer_state_held = False  # the optimizers hold state for the sharded quantized weights
        self.initialized = False
        self.stages: list[Any] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(max_bits=self.selection.max_bits)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if any(refused in name for refused in _REFUSED_STRATEGIES):
            raise ValueError(
                f"strategy {name} is not supported by ALQ; to shard the model use ModelParallelStrategy and apply "
                f"torch.distributed.fsdp.fully_shard in configure_model (FSDP2), or strategy='ddp' if it fits a device"
            )
        refuse_twice(trainer, ALQInit, "init", "ALQ's multi-bit state",
                     "ALQCallback brings its own ALQInit; stages used alone share one ALQInit")
        check_materialised(pl_module)
        if self.network is not None and self.network.belongs_to(pl_module):
            return
        if self.network is not None:
            rank_zero_info(f"ALQ sets up afresh for a new {type(pl_module).__name__}: the state of the earlier "
                           f"model stays with it")
            self.initialized = False
            for stage in self.stages:
                stage.reset()
        self.sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        if self.sharded:  # configure_model shards the weights after setup: attach in on_fit_start
            self.network = None
            return
        layers, float_layers = attach(pl_module, self.selection)
        self.network = MultiBitNetwork(layers, float_layers, self.config, compile=self.compile)
        ignored = [".".join(filter(None, (q.module_name, q.buffer_name(key))))
                   for q in layers.values() for key in q.multibit_tensors()]
        pl_module._ddp_params_and_buffers_to_ignore = (
            list(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", [])) + ignored
        )
        floats = ", ".join(f"{n} ({why})" for n, why in float_layers.items()) or "none"
        rank_zero_info(f"ALQ quantizes {len(layers)} layers; left in float: {floats}")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.optimizer_state_held = False
        if self.network is None and self.sharded:
            self.network = attach_network(pl_module, self.selection, self.config, self.compile)
            for stage in self.stages:
                stage.setup(trainer, pl_module, "fit")
        if not self.network.belongs_to(pl_module):
            raise ValueError(f"the layers ALQ attached to in setup ({', '.join(self.network.layers)}) are no longer "
                             f"modules of {type(pl_module).__name__}: LightningModule.configure_model replaced them. "
                             f"Materialise weights built on the meta device in place there (to_empty(device=...), "
                             f"then initialise them), or build the model before Trainer.fit")
        if not self.initialized:
            self.network.initialize()
            self.initialized = True
            rank_zero_info(f"ALQ initialised at {self.network.avg_bits:.3f} average bits\n{bit_summary(pl_module)}")

    def register(self, stage: Any) -> None:
        """Stages register themselves so that gradients are dropped only when none of them is active."""
        if stage not in self.stages:
            self.stages.append(stage)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.sharded and not self.optimizer_state_held:  # after a resume loaded the optimizers, before a checkpoint
            hold_optimizer_state(trainer.optimizers, self.network.layers)
            self.optimizer_state_held = True
        if not any(stage.active(trainer) for stage in self.stages):
            self.network.drop_grads()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        summary = bit_summary(pl_module)
        metrics = {"alq/avg_bits": summary.avg_bits, "alq/storage_bytes": float(summary.storage_bytes),
                   "alq/model_bytes": float(summary.model_bytes)}
        metrics.update({f"alq/{row.name}/bits": row.avg_bits for row in summary.rows})
        if summary.act_rows:
            metrics.update({"alq/bops": float(summary.bops), "alq/macs": float(summary.macs)})
        pl_module.log_dict(metrics, rank_zero_only=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        scalars = self.network.scalars() if self.network is not None else {}
        return {"initialized": self.initialized, **scalars}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initialized = bool(state_dict["initialized"])
        if self.network is not None and "initial_bits" in state_dict:
            self.network.load_scalars(state_dict)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if isinstance(self.network, ShardedNetwork) and getattr(trainer.strategy, "_save_distributed_checkpoint", 0):
            # a sharded checkpoint: each process writes its own shard of the state with the model's
            checkpoint["state_dict"].update(self.network.sharded_state_dict())
            checkpoint[CHECKPOINT_KEY] = {SHARDED_KEY: self.network.latents_held()}
        else:
            checkpoint[CHECKPOINT_KEY] = self.network.state_tensors()
        checkpoint[STRUCTURES_KEY] = self.network.structures()

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        tensors = checkpoint.get(CHECKPOINT_KEY)
        if tensors is None:
            raise ValueError(
                "the checkpoint holds no ALQ multi-bit state (key 'alq'); it was not written with ALQInit/"
                "ALQCallback attached. Load its dense weights with LightningModule.load_from_checkpoint instead"
            )
        self.network.check_structures(checkpoint.get(STRUCTURES_KEY, {}))
        if SHARDED_KEY not in tensors:
            self.network.load_state_tensors(tensors)
        elif isinstance(self.network, ShardedNetwork) and trainer.ckpt_path and Path(trainer.ckpt_path).is_dir():
            self.network.load_sharded(trainer.ckpt_path, tensors[SHARDED_KEY])
        else:
            raise ValueError(
                "the checkpoint holds the ALQ state of a sharded fit, in the shards of its folder: resume it under "
                "ModelParallelStrategy on as many processes, or make one file of it first with "
                "alq_lightning.consolidate_checkpoint(folder, file) (python -m alq_lightning consolidate)"
            )


def held(trainer: Trainer, kind: type, attr: str) -> dict[int, tuple[Any, Callback]]:
    """``{id(part): (part, holder)}`` for each ``kind`` object in ``trainer.callbacks``, a callback itself or its
    attribute ``attr`` (ALQCallback's ``init`` and ``activations``, a stage's bound ``init``), with the first
    callback that holds it."""
    found = {}
    for callback in trainer.callbacks:
        part = callback if isinstance(callback, kind) else getattr(callback, attr, None)
        if isinstance(part, kind):
            found.setdefault(id(part), (part, callback))
    return found


def refuse_twice(trainer: Trainer, kind: type, attr: str, what: str, hint: str) -> None:
    """ValueError naming the callbacks when ``trainer`` holds more than one ``kind`` (:func:`held`): each would
    attach ``what`` to the model on its own."""
    found = held(trainer, kind, attr)
    if len(found) > 1:
        names = " and ".join(holder.state_key for _, holder in found.values())
        raise ValueError(f"Trainer(callbacks=...) holds {len(found)} callbacks that each attach {what} to the model: "
                         f"{names}; keep one ({hint})")


def check_materialised(pl_module: LightningModule) -> None:
    """ValueError naming the parameters and buffers of ``pl_module`` on the meta device (shapes without values)
    unless its ``configure_model``, which Lightning runs after the callbacks' ``setup`` and before ALQ initialises
    from the weights at the start of the fit, may materialise them."""
    meta = [name for name, tensor in (*pl_module.named_parameters(), *pl_module.named_buffers()) if tensor.is_meta]
    if meta and not is_overridden("configure_model", pl_module):
        more = f" and {len(meta) - 4} more" if len(meta) > 4 else ""
        raise ValueError(
            f"{type(pl_module).__name__} has {len(meta)} parameters or buffers on the meta device, without values: "
            f"{', '.join(meta[:4])}{more}. ALQ initialises from the weights at the start of the fit, after "
            f"LightningModule.configure_model: materialise them before Trainer.fit, or in place in configure_model "
            f"(to_empty(device=...), then initialise them)")


def find_init(trainer: Trainer, owner: object) -> ALQInit:
    """The ``ALQInit`` callback of ``trainer`` (exactly one), or a clear error naming ``owner``."""
    found = held(trainer, ALQInit, "init")  # a stage set up already points at its ALQInit
    if len(found) != 1:
        names = " and ".join(holder.state_key for _, holder in found.values())
        raise ValueError(f"{type(owner).__name__} needs exactly one ALQInit (or ALQCallback) in "
                         f"Trainer(callbacks=...), found {len(found)}" + (f": {names}" if names else ""))
    return next(iter(found.values()))[0]

