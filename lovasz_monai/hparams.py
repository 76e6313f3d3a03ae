"""Which modules a model keeps in its hyperparameters: ``class_path`` dicts given by a config
(rebuildable from a checkpoint), not Python objects (their weights are in the ``state_dict``).
No Lightning import: the model passes its own ``save_hyperparameters``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import FrameType
from typing import Any

__all__ = ["modules_from_config", "save_hyperparameters"]

_MODULES_FROM_CONFIG: ContextVar[bool] = ContextVar("lovasz_modules_from_config", default=False)


@contextmanager
def modules_from_config() -> Iterator[None]:
    """Within this context a model keeps ``network``/``loss``/``warmup_loss`` in its hparams.

    :class:`~lovasz_monai.cli.LovaszCLI` instantiates its classes inside it: LightningCLI then
    gives ``save_hyperparameters`` the parsed config, where these arguments are ``class_path``
    dicts, so a checkpoint can rebuild a custom network or loss. Outside it, a module passed as
    a Python object is left out of the hparams (its weights are in the ``state_dict``).

    Example:
        >>> with modules_from_config():
        ...     _MODULES_FROM_CONFIG.get()
        True
    """
    token = _MODULES_FROM_CONFIG.set(True)
    try:
        yield
    finally:
        _MODULES_FROM_CONFIG.reset(token)


def save_hyperparameters(
    save: Callable[..., None], frame: FrameType | None, **modules: Any
) -> None:
    """``save(ignore=..., frame=frame)`` (a LightningModule's ``save_hyperparameters`` of the
    ``__init__`` in ``frame``), leaving out the ``modules`` given as Python objects unless
    :func:`modules_from_config` is active.

    Example:
        >>> calls = []
        >>> save_hyperparameters(lambda **kw: calls.append(kw["ignore"]), None, loss=object())
        >>> calls
        [['loss']]
    """
    from_config = _MODULES_FROM_CONFIG.get()
    ignore = [] if from_config else [k for k, v in modules.items() if v is not None]
    save(ignore=ignore, frame=frame)
