"""The estimator's arguments: scikit-learn's parameter protocol (`get_params`, `set_params`, `clone`, the repr), an
unknown keyword refused with the closest name (also the names RecTools, the original SASRec code and Hugging Face
use), and the checks of the call arguments the recommend methods share (`k`, `on_unknown`)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from sasrec_jax.config import TrainConfig
from sasrec_jax.errors import ConfigError, DataError, UnknownArgumentError

TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
ON_UNKNOWN = ("warn", "skip", "raise")
# the names RecTools, the original SASRec code and Hugging Face give our arguments
ALIASES = {
    "learning_rate": "lr",
    "n_epochs": "epochs",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "n_heads": "num_heads",
    "n_blocks": "num_blocks",
    "n_factors": "dim",
    "hidden_units": "dim",
    "hidden_size": "dim",
    "embedding_dim": "dim",
    "session_max_len": "max_len",
    "maxlen": "max_len",
    "dropout_rate": "dropout",
    "per_device_train_batch_size": "batch_size",
}


def refuse_unknown(given, known: Sequence[str], owner: str = "SASRec") -> None:
    """UnknownArgumentError (a TypeError) for the first name in `given` that is not in `known`, naming the closest
    known one."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, [*known, *ALIASES], n=1)
    hint = f"; did you mean {ALIASES.get(close[0], close[0])!r}?" if close else f"; see help({owner}) for the arguments"
    raise UnknownArgumentError(f"{owner}() got an unexpected keyword argument {name!r}{hint}")


class Params:
    """scikit-learn's parameter protocol for the estimator. The constructor's arguments are its own keyword
    parameters and every `TrainConfig` field (through **train_kwargs); an instance keeps them in `preset`,
    `model_kwargs`, `data_config`, `train_config` (with `_preset_train_fields`, those left to the preset),
    `devices`, `progress` and `verbose`."""

    preset: str
    model_kwargs: dict
    data_config: Any
    train_config: TrainConfig
    _preset_train_fields: tuple
    devices: Any
    progress: bool
    verbose: bool

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """The constructor's arguments: its own (preset, model and data fields, devices, progress, verbose) and
        every `TrainConfig` field. `random_state` is accepted as another name for `seed`."""
        own = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "random_state")]
        return (*own[:-1], *TRAIN_FIELDS)  # own[-1] is **train_kwargs

    def get_params(self, deep: bool = True) -> dict:
        """The constructor arguments this estimator was built with (as scikit-learn's `get_params`): fields the
        preset fills in at fit() are None here, as they were given."""
        own = {"preset": self.preset, **self.model_kwargs, **dataclasses.asdict(self.data_config)}
        own.update(devices=self.devices, progress=self.progress, verbose=self.verbose)
        train = {f: None if f in self._preset_train_fields else getattr(self.train_config, f) for f in TRAIN_FIELDS}
        return {**own, **train}

    def set_params(self, **params):
        """Changes constructor arguments (checked as the constructor checks them); a fitted model keeps its weights
        until the next fit()."""
        refuse_unknown(params, [*self.param_names(), "random_state"], type(self).__name__)
        if "random_state" in params:
            params["seed"] = params.pop("random_state")
        fresh = type(self)(**{**self.get_params(), **params})
        for attr in ("preset", "data_config", "model_kwargs", "_preset_train_fields", "train_config"):
            setattr(self, attr, getattr(fresh, attr))
        self.devices, self.progress, self.verbose = fresh.devices, fresh.progress, fresh.verbose
        return self

    def clone(self):
        """A new, unfitted estimator with the same constructor arguments (scikit-learn's `clone`)."""
        return type(self)(**self.get_params())

    def __repr__(self) -> str:
        # scikit-learn's repr: only the arguments that differ from the defaults (those of the first class in the
        # hierarchy that defines the constructor, so that a subclass's repr compares with its base)
        base = next(c for c in type(self).__mro__ if "__init__" in vars(c))
        defaults = base().get_params()
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if k not in defaults or defaults[k] != v]
        return f"{type(self).__name__}({', '.join(changed)})"


def check_k(k) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_on_unknown(on_unknown: str) -> None:
    if on_unknown not in ON_UNKNOWN:
        raise ConfigError(f"on_unknown must be one of {', '.join(ON_UNKNOWN)}, got {on_unknown!r}")


def unknown_ids(values: list, what: str, on_unknown: str) -> None:
    """Unknown ids: a warning (and skipped), skipped, or a DataError, as `on_unknown` says."""
    if not values or on_unknown == "skip":
        return
    msg = f"{len(values)} unknown {what} id{'s' if len(values) > 1 else ''} (not in the training data): {values[:10]}"
    if on_unknown == "raise":
        raise DataError(msg + "; pass on_unknown='warn' or 'skip' to leave them out")
    warnings.warn(msg + "; skipped", UserWarning, stacklevel=3)  # points at the caller of the method
