"""Model-level plumbing: the bridge from a model-level capability to a model family's forward.

Most adapters act inside one layer. A few act on the whole model: their adapter *has* a capability
of :mod:`deltatune.core.contract` (:class:`~deltatune.core.contract.VirtualTokens`: N embeddings
prepended to the input; :class:`~deltatune.core.contract.KeyValuePrefix`: per-layer keys and values
prepended to the attention cache), and something must feed it to the model: find the input
embedding, lengthen the attention mask, shift positions, fill the cache. That something depends on
the model family (transformers today) and lives in ``integrations/``.

So the contract is a small explicit table, :data:`PROVIDERS`: capability -> provider.

- A config declares the capability it needs served (``plumbing = VirtualTokens``) and, in
  ``on_attach``, asks ``provider(self.plumbing)`` for the provider's checks and hooks; the method
  file never imports ``integrations/``.
- ``integrations/transformers_plumbing.py`` defines the providers; ``deltatune/__init__.py``, the
  one module that may import every layer, puts them in the table with one explicit statement.
- The core names capabilities, never methods, and imports nothing above it.

Why a table rather than ``integrations`` registering itself on import: nothing happens as a side
effect of importing a module; the one line that wires them is in ``deltatune/__init__.py``.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from deltatune.core.layer import AdaptedLayer


class Plumbing(Protocol):
    """What every provider offers: the checked layer that holds the adapter, and the hooks."""

    def input_layer(self, model: nn.Module, name: str, config: Any, method: str) -> AdaptedLayer:
        """The adapted input embedding that holds ``config``'s part of adapter ``name``, after
        checking that the model can take it (``ValueError`` naming the fix otherwise)."""
        ...

    def hooks(self, model: nn.Module, layer: AdaptedLayer, name: str, method: str) -> list[Any]:
        """Install the model-level hooks of adapter ``name``; removable handles."""
        ...


class VirtualTokenPlumbing(Plumbing, Protocol):
    """Serves :class:`~deltatune.core.contract.VirtualTokens`."""

    def token_ids(self, text: str, tokenizer: str | None, model: nn.Module) -> list[int]:
        """Token ids of ``text`` with the tokenizer at ``tokenizer`` (default: the model's)."""
        ...


class KeyValuePlumbing(Plumbing, Protocol):
    """Serves :class:`~deltatune.core.contract.KeyValuePrefix`."""

    def layout(self, model: nn.Module) -> tuple[int, int, int]:
        """The model's attention layout: (layers, key/value heads, head width)."""
        ...


#: Capability (a Protocol of ``core.contract``) -> its provider. Filled by ``deltatune/__init__.py``.
PROVIDERS: dict[type, Any] = {}


def provider(capability: type) -> Any:
    """The provider serving ``capability``; ``RuntimeError`` naming the fix when none is registered."""
    found = PROVIDERS.get(capability)
    if found is None:
        raise RuntimeError(
            f"no model-level plumbing is registered for {capability.__name__}; `import deltatune` registers "
            "the transformers integration (deltatune.core.plumbing.PROVIDERS)"
        )
    return found
