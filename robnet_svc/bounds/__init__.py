"""The bound engine (SPEC §3): compile a network, then bound its margins over an AffineSet.

    net = compile_network(module)                 # RobnetError on unsupported ops
    lower = RSIPSSIP().margin_lower(net, aset, labels)   # [B, K-1]
"""

from robnet_svc.bounds.graph import BoundNetwork, compile_network, find_unsupported
from robnet_svc.bounds.methods import IBP, RSIP, RSIPIBP, RSIPSSIP, SSIP, BoundMethod
from robnet_svc.bounds.spec import margin_spec

__all__ = ["BoundMethod", "BoundNetwork", "compile_network", "find_unsupported", "margin_spec",
           "IBP", "SSIP", "RSIP", "RSIPIBP", "RSIPSSIP"]
