"""The method-agnostic engine: targeting, the adapted layer, attach/detach, save/load, merge."""
