"""The one place that imports Flower 1.42 internals (modules outside ``flwr.app``, ``flwr.serverapp``,
``flwr.clientapp`` and ``flwr.simulation``), each with the reason no public API serves. A Flower upgrade
that moves one of them breaks here, at import, with the name in the traceback. The one other place is
``server/superlink.py``, the SuperLink launcher, which sets Flower's SQLite busy timeout (its docstring
says why); it is kept apart so that no other process loads the SuperLink's code.
"""

# Error codes of an error reply: the public ``flwr.app.Error`` takes one, but Flower exports the codes
# only from here.
# The coordinator's deployment commands write the flwr CLI's SuperLink connection the way `flwr` does.
from flwr.cli.flower_config import write_superlink_connection
from flwr.cli.typing import SuperLinkConnection
from flwr.common.constant import ErrorCode

# Site-level DP at a site: Flower's update clipping (what fixedclipping_mod calls). The mod itself needs
# the reply to carry exactly the weights the message brought; our sites return only what they trained.
from flwr.supercore.differential_privacy import compute_clip_model_update

# Site-level DP: Flower's own RDP accountant (what its DifferentialPrivacy* strategy wrappers use), which
# the public API does not export; our strategy aggregates partition by partition and accounts itself.
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from flwr.supercore.utils import get_flwr_home

__all__ = [
    "ErrorCode",
    "GaussianPrivacyEvent",
    "NeighboringRelation",
    "PrivacyConfig",
    "RdpAccountant",
    "SamplingMethod",
    "SuperLinkConnection",
    "compute_clip_model_update",
    "get_flwr_home",
    "write_superlink_connection",
]
