"""Every Lightning hook the package's callbacks define is marked ``@override`` (as Lightning's own callbacks are),
so that a hook renamed in Lightning fails type checks instead of silently never running."""
from __future__ import annotations

import inspect

from lightning.pytorch import Callback

import alq_lightning.callbacks.activations
import alq_lightning.callbacks.alq_callback
import alq_lightning.callbacks.init
import alq_lightning.callbacks.stages

MODULES = (alq_lightning.callbacks.activations, alq_lightning.callbacks.alq_callback, alq_lightning.callbacks.init,
           alq_lightning.callbacks.stages)
HOOKS = {name for name in dir(Callback) if not name.startswith("__")}


def defined_hooks() -> list[tuple[str, object]]:
    found = []
    for module in MODULES:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Callback) and cls.__module__ == module.__name__:
                for name, value in vars(cls).items():
                    if name in HOOKS:
                        found.append((f"{cls.__name__}.{name}", value.fget if isinstance(value, property) else value))
    return found


def test_every_hook_the_callbacks_define_is_marked_override():
    hooks = defined_hooks()
    assert len(hooks) >= 40 and "ALQCallback.on_train_epoch_end" in dict(hooks)
    # Hooks given as another name (on_test_start = on_validation_start) are that function's definition's concern.
    defined = [(name, function) for name, function in hooks if function.__name__ == name.split(".")[1]]
    assert len(defined) >= 40
    assert [name for name, function in defined if not getattr(function, "__override__", False)] == []
