"""Site data: configuration, MONAI pipeline, demo phantoms, partitioning."""

from .demo import DEMO_MODALITIES, demo_site, make_demo_sites
from .datasets import Case, PatientCrops, SiteData, SiteDataError, list_cases, split_cases
from .partition import partition_cases, split_dataset, write_site_config
from .phantoms import CLASS_NAMES, DEMO_LABELS, generate_phantoms
from .site_config import SiteConfig, SiteConfigError, load_site_config, validate_site_config_dict

__all__ = [
    "CLASS_NAMES", "DEMO_LABELS", "DEMO_MODALITIES", "Case", "PatientCrops", "SiteConfig", "SiteConfigError", "SiteData", "SiteDataError",
    "demo_site", "generate_phantoms", "list_cases", "load_site_config", "make_demo_sites", "partition_cases", "split_cases", "split_dataset",
    "validate_site_config_dict", "write_site_config",
]
