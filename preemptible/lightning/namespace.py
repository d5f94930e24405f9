"""Which Lightning a script uses: ``lightning.pytorch`` or ``pytorch_lightning``, both first class.

The two packages ship the same code under two names, and their classes are distinct: a
``pytorch_lightning.Callback`` is not a ``lightning.pytorch.Callback``, so ``lightning.pytorch.cli``
refuses it, and an ``isinstance`` check against one package's ``SLURMEnvironment`` misses the
other's. preemptible therefore has one implementation (:class:`preemptible.lightning.callback.PreemptionCallback`)
and one subclass of it per package's ``Callback``:

* ``preemptible.lightning.pytorch.PreemptionCallback`` — a ``lightning.pytorch.Callback``;
* ``preemptible.lightning.pytorch_lightning.PreemptionCallback`` — a ``pytorch_lightning.Callback``;
* ``preemptible.lightning.both.PreemptionCallback`` — a subclass of both, for a process that has imported both.

``preemptible.PreemptionCallback`` names the one that fits the packages the process has imported
(:func:`callback_class`), looked up at each access, so ``class_path: preemptible.PreemptionCallback``
in a LightningCLI config passes the subclass check of whichever CLI reads it. Every isinstance check
and private access then acts on the package of the trainer the callback is attached to (:func:`of`).
Nothing here imports a Lightning package the process has not asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LightningPackage:
    """One of the two names Lightning is installed under.

    Attributes:
        module: the trainer package (``lightning.pytorch`` or ``pytorch_lightning``).
        fabric: its Fabric package (``lightning.fabric`` or ``lightning_fabric``).
        distribution: the pip distribution that provides it (``lightning`` or ``pytorch-lightning``).
        adapter: preemptible's module holding the callback class for it.
    """

    module: str
    fabric: str
    distribution: str
    adapter: str

    @property
    def imported(self) -> bool:
        return self.module in sys.modules

    @property
    def installed(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:  # the parent package ("lightning") is missing
            return False

    def load_module(self) -> Any:
        return importlib.import_module(self.module)

    def load(self, submodule: str, name: str) -> Any:
        """``load("callbacks", "Callback")`` → that object of this package (importing the submodule)."""
        return getattr(importlib.import_module(f"{self.module}.{submodule}"), name)

    def load_fabric(self, submodule: str, name: str) -> Any:
        return getattr(importlib.import_module(f"{self.fabric}.{submodule}"), name)

    def callback_class(self) -> type:
        return importlib.import_module(self.adapter).PreemptionCallback


LIGHTNING = LightningPackage("lightning.pytorch", "lightning.fabric", "lightning", "preemptible.lightning.pytorch")
PYTORCH_LIGHTNING = LightningPackage("pytorch_lightning", "lightning_fabric", "pytorch-lightning",
                                     "preemptible.lightning.pytorch_lightning")
PACKAGES = (LIGHTNING, PYTORCH_LIGHTNING)
BOTH_ADAPTER = "preemptible.lightning.both"
#: the one implementation, neutral to the package (each adapter subclasses it with its package's Callback)
IMPLEMENTATION = "preemptible.lightning.callback"


def by_name(name: str) -> LightningPackage:
    """``"lightning"``/``"lightning.pytorch"`` or ``"pytorch_lightning"``/``"pytorch-lightning"`` → the package."""
    for package in PACKAGES:
        if name in (package.module, package.distribution, package.module.split(".")[0]):
            return package
    raise ValueError(f"unknown Lightning package {name!r}: use 'lightning' (lightning.pytorch) or 'pytorch_lightning'")


def of(obj: Any) -> LightningPackage:
    """The package whose classes ``obj`` (a Trainer, a strategy, a logger) is built from.

    A user's subclass defined in their own module is followed up its bases to Lightning's class.
    """
    for cls in type(obj).__mro__:
        module = cls.__module__ or ""
        for package in PACKAGES:
            if module == package.module or module.startswith(package.module + "."):
                return package
    imported = [p for p in PACKAGES if p.imported]
    return imported[0] if len(imported) == 1 else PYTORCH_LIGHTNING


def callback_class() -> type:
    """The ``PreemptionCallback`` for the Lightning this process uses.

    Exactly one of the packages imported: its class. Both imported: the class that subclasses both
    (it passes either package's checks). Neither imported yet (``from preemptible import
    PreemptionCallback`` sorted above ``import lightning``): the implementation class itself, which
    picks the concrete class when it is constructed, by the same rule; with nothing imported even
    then, the installed package (both installed: both).
    """
    imported = [p for p in PACKAGES if p.imported]
    if len(imported) == 1:
        return imported[0].callback_class()
    if len(imported) == 2:
        return importlib.import_module(BOTH_ADAPTER).PreemptionCallback
    # Loaded by name like the adapters: the implementation uses this module to pick its concrete class.
    return importlib.import_module(IMPLEMENTATION).PreemptionCallback


def class_at_construction() -> type:
    """The concrete class a namespace-neutral ``PreemptionCallback(...)`` becomes (see :func:`callback_class`)."""
    imported = [p for p in PACKAGES if p.imported]
    if len(imported) == 1:
        return imported[0].callback_class()
    installed = imported or [p for p in PACKAGES if p.installed]
    if len(installed) == 1:
        return installed[0].callback_class()
    if not installed:
        raise ImportError("preemptible.PreemptionCallback needs Lightning: pip install lightning (or pytorch-lightning)")
    return importlib.import_module(BOTH_ADAPTER).PreemptionCallback


def package_in_use() -> LightningPackage:
    """The package this process imported if only one, else ``pytorch_lightning`` (for code that must pick at import)."""
    imported = [p for p in PACKAGES if p.imported]
    return imported[0] if len(imported) == 1 else PYTORCH_LIGHTNING
