"""Model-level plumbing: methods declare a capability; integrations/ serves it through core's table."""

from __future__ import annotations

import pytest

import deltatune as dt
from deltatune.core.contract import KeyValuePrefix, VirtualTokens
from deltatune.core.plumbing import PROVIDERS, KeyValuePlumbing, VirtualTokenPlumbing, provider


def test_import_deltatune_registers_a_provider_for_every_declared_capability():
    declared = {cls.plumbing for cls in dt.METHODS.values() if cls.plumbing is not None}
    assert declared == {VirtualTokens, KeyValuePrefix}
    assert declared <= set(PROVIDERS)
    for method in ("input_layer", "hooks", "token_ids"):
        assert callable(getattr(provider(VirtualTokens), method))
        assert method in dir(VirtualTokenPlumbing)
    for method in ("input_layer", "hooks", "layout"):
        assert callable(getattr(provider(KeyValuePrefix), method))
        assert method in dir(KeyValuePlumbing)


def test_a_capability_nobody_serves_names_the_fix():
    class Unserved:
        pass

    with pytest.raises(RuntimeError, match="no model-level plumbing is registered for Unserved"):
        provider(Unserved)
