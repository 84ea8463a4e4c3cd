"""A Lightning checkpoint to the quantized model it holds, for ``alq-export`` (:mod:`alq_lightning.packed.cli`).

The model is built with :func:`alq_lightning.models.build_model` from ``model/in_channels/num_classes/
input_size``, each falling back to the checkpoint's hyper-parameters (a ``ClassifierModule`` built with
``architecture=``, as ``train.py`` builds it, stores all of them). Its dense weights come from the
checkpoint's ``state_dict`` (keys under ``prefix``, default ``model.``), its multi-bit tensors from the
``"alq"`` key; each layer's structure is the one under which those tensors reproduce the dense weight. Input
quantizers saved under ``"alq_activations"`` (``ALQCallback(act_bits=...)``, ``ActivationQuantization``) are
attached and switched on, so that the exported file carries them. Any other LightningModule is rebuilt by its
own ``load_from_checkpoint`` (:func:`module_from_checkpoint`) and exported whole.
"""
from __future__ import annotations

import importlib
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..activations import CHECKPOINT_KEY
from ..consolidate import read_sharded_checkpoint
from ..core import GroupLayout, MultiBitState, auto_layout
from ..layers import LayerSelection, attach, resolve
from ..models import MODEL_NAMES, build_model
from .format import MAGIC
from .io import restore_activations

_ARCHITECTURE = ("in_channels", "num_classes", "input_size")
_CONV_STRUCTURES = ("kernelwise", "pixelwise", "channelwise")


def candidate_layouts(shape: tuple[int, ...], group_size: int) -> list[GroupLayout]:
    """Layouts of a weight ``shape`` whose groups hold ``group_size`` weights."""
    names = list(_CONV_STRUCTURES) if len(shape) > 2 else []
    if shape[-1] % group_size == 0:
        names.append(f"subchannelwise({shape[-1] // group_size})")
    if len(shape) == 2 and shape[0] % group_size == 0:
        names.append(f"columnwise({shape[0] // group_size})")
    layouts = [auto_layout(shape, name) for name in names]
    return [layout for layout in layouts if layout.group_size == group_size]


def infer_structure(name: str, weight: torch.Tensor, state: MultiBitState, saved: str | None = None) -> str:
    """The structure under which ``state`` reconstructs the dense ``weight`` most closely (it must match); only
    ``saved`` is tried when given."""
    errors = {}
    shape = tuple(weight.shape)
    layouts = candidate_layouts(shape, state.group_size) if saved is None else [auto_layout(shape, saved)]
    for layout in layouts:
        if (layout.num_groups, layout.group_size) == (state.num_groups, state.group_size):
            rebuilt = layout.from_groups(state.reconstruct()).to(weight.dtype)
            errors[layout.describe()] = float((rebuilt - weight).abs().max())
    tolerance = 1e-5 * max(1.0, float(weight.abs().max()))
    best = min(errors, key=errors.get, default=None)
    if best is None or errors[best] > tolerance:
        raise ValueError(f"the multi-bit tensors of layer {name!r} (codes {tuple(state.codes.shape)}) do not "
                         f"reproduce its dense weight {tuple(weight.shape)} under "
                         f"{'any structure' if saved is None else 'its saved structure ' + saved}")
    return best


def architecture(hparams: Mapping[str, Any], **given: Any) -> tuple[str, dict[str, Any]]:
    """``(model name, build_model keyword arguments)`` from ``given`` values, else the hyper-parameters: their
    ``architecture`` (or ``model``) mapping, which may add constructor arguments such as ``width``, then their
    top-level keys."""
    saved = next((hparams[key] for key in ("architecture", "model") if isinstance(hparams.get(key), Mapping)), {})
    values = {key: given.get(key) or saved.get(key) or hparams.get(key) for key in _ARCHITECTURE}
    name = given.get("model") or saved.get("name") or hparams.get("model_name")
    if isinstance(hparams.get("model"), str):
        name = name or hparams["model"]
    missing = [f"--{key.replace('_', '-')}" for key, value in (("model", name), *values.items()) if value is None]
    if missing:
        raise ValueError("the checkpoint's hyper-parameters do not give the model architecture; "
                         f"pass {' '.join(missing)}"
                         f" (models: {', '.join(MODEL_NAMES)})")
    same_model = saved.get("name") == name
    kwargs = {key: value for key, value in saved.items() if same_model and key not in ("name", *_ARCHITECTURE)}
    kwargs.update({key: int(value) for key, value in values.items()})
    return name, kwargs


def read_checkpoint(path: str) -> Mapping[str, Any]:
    """The Lightning checkpoint at ``path`` (``torch.load`` with ``weights_only=True``; a sharded checkpoint's
    folder consolidated in memory); ValueError saying what was expected and what was found otherwise."""
    if Path(path).is_dir():
        return read_sharded_checkpoint(path)
    with open(path, "rb") as handle:
        start = handle.read(len(MAGIC))
    if start == MAGIC:
        raise ValueError(f"{path} is an ALQ packed file (what this command writes), not a Lightning checkpoint: "
                         "give the .ckpt written by training with ALQ attached")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a checkpoint: expected a Lightning .ckpt, which torch.save writes as a "
                         "zip archive; this file is not one")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        lines = str(error).splitlines()
        reason = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        raise ValueError(f"{path} is a torch file that cannot be read safely (weights_only=True): {reason}") from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint: it holds no 'state_dict' (expected the .ckpt "
                         "written by training with ALQ attached)")
    return checkpoint


def model_from_checkpoint(checkpoint: Mapping[str, Any], prefix: str = "model.", **given: Any) -> nn.Module:
    """The quantized model stored in a Lightning checkpoint (dense ``state_dict`` + ``"alq"`` tensors, and the
    input quantizers under ``"alq_activations"`` when it has them), in the dtype of its weights when they all
    share one."""
    name, kwargs = architecture(checkpoint.get("hyper_parameters") or {}, **given)
    model = build_model(name, **kwargs)
    state = {key[len(prefix):]: value for key, value in checkpoint.get("state_dict", {}).items()
             if key.startswith(prefix)}
    dtypes = {value.dtype for value in state.values() if value.is_floating_point()}
    if len(dtypes) == 1:  # a run in 16-true / bf16-true / 64-true stored its weights (ŵ) in that dtype
        model.to(dtypes.pop())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"the checkpoint's state_dict under {prefix!r} does not fit {name} {kwargs}: "
                         f"{error}") from None
    tensors, structures, quantizers = (
        {layer[len(prefix):]: value for layer, value in (checkpoint.get(key) or {}).items() if layer.startswith(prefix)}
        for key in ("alq", "alq_structures", CHECKPOINT_KEY))
    if not tensors:
        raise ValueError(f"the checkpoint holds no multi-bit tensors under 'alq' for layers under {prefix!r}")
    attach_tensors(model, tensors, structures)
    restore_activations(model, quantizers)
    return model


def module_from_checkpoint(path: str, checkpoint: Mapping[str, Any], class_path: str) -> nn.Module:
    """Any LightningModule's checkpoint at ``path``: the class ``class_path`` (``package.module.Class``) rebuilt by
    its ``load_from_checkpoint`` (its saved hyper-parameters, dense weights), then the checkpoint's multi-bit
    tensors and input quantizers attached under the module's own layer names."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"--module={class_path!r} cannot be imported ({error}); give package.module.Class") from None
    if not callable(getattr(cls, "load_from_checkpoint", None)):
        raise ValueError(f"--module={class_path!r} is not a LightningModule class (it has no load_from_checkpoint)")
    try:
        module = cls.load_from_checkpoint(path, map_location="cpu")
    except Exception as error:  # the module's own __init__ may raise anything for arguments it lacks
        raise ValueError(f"{class_name}.load_from_checkpoint({path!r}) failed: {type(error).__name__}: {error} "
                         "(its __init__ arguments must be in the checkpoint: self.save_hyperparameters())") from None
    tensors = checkpoint.get("alq") or {}
    if not tensors:
        raise ValueError(f"{path} holds no multi-bit tensors under 'alq': it was not written with ALQ attached")
    attach_tensors(module, tensors, checkpoint.get("alq_structures"))
    restore_activations(module, checkpoint.get(CHECKPOINT_KEY) or {})
    return module.eval()


def attach_tensors(model: nn.Module, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                   saved: Mapping[str, str] | None = None) -> None:
    """Attach multi-bit state holding ``{layer: {"codes", "coords", "mask", ...}}`` to ``model``, each layer in
    its ``saved`` structure (the checkpoint's ``"alq_structures"``) or, for checkpoints without, the one inferred
    from its dense weight."""
    structures, max_bits = {}, {}
    for name, layer in tensors.items():
        target = resolve(model, name)
        if target is None:
            raise ValueError(f"multi-bit layer {name!r} of the checkpoint is not a weight parameter of the model")
        state = MultiBitState(layer["codes"], layer["coords"], layer["mask"].bool())
        structures[name] = infer_structure(name, getattr(*target).detach(), state, (saved or {}).get(name))
        max_bits[name] = state.max_bits
    layers, _ = attach(model, LayerSelection(max_bits=next(iter(max_bits.values())), include=list(tensors),
                                             structures=structures, max_bits_overrides=max_bits))
    for name, layer in layers.items():
        for key, tensor in layer.multibit_tensors().items():
            if key in tensors[name] and key != "latent":  # latent weights exist only during STE; export needs none
                tensor.copy_(tensors[name][key])
        layer.write_weight()

