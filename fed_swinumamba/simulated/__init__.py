"""What only a simulation uses, apart from what a hospital's site runs: phantom datasets, the split of one
dataset into simulated sites, the built-in three-site demo, and the baselines (centralized on pooled data, local-only at each site)."""

from .baseline import Budget, train_centralized, train_local_only
from .demo import DEMO_MODALITIES, default_demo_root, demo_site, make_demo_sites
from .partition import partition_cases, split_dataset, write_site_config
from .phantoms import CLASS_NAMES, DEMO_LABELS, generate_phantoms

__all__ = [
    "Budget",
    "CLASS_NAMES",
    "DEMO_LABELS",
    "DEMO_MODALITIES",
    "default_demo_root",
    "demo_site",
    "generate_phantoms",
    "make_demo_sites",
    "partition_cases",
    "split_dataset",
    "train_centralized",
    "train_local_only",
    "write_site_config",
]
