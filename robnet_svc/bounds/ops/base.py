"""Per-operation bound rules: the base class (the engine helper fills in the contract)."""


class OpRule:
    """Interval, forward-symbolic and backward-symbolic rules of one graph operation."""
