"""Site data: configuration, checks and the MONAI pipeline a hospital's site runs."""

from .datasets import Case, PatientCrops, SiteData, SiteDataError, list_cases, split_cases
from .site_config import SiteConfig, SiteConfigError, load_site_config, validate_site_config_dict

__all__ = [
    "Case",
    "PatientCrops",
    "SiteConfig",
    "SiteConfigError",
    "SiteData",
    "SiteDataError",
    "list_cases",
    "load_site_config",
    "split_cases",
    "validate_site_config_dict",
]
