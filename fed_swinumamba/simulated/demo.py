"""The built-in three-hospital demo: one CT, one MRI and one ultrasound phantom site.

Used by ``python -m simulation demo`` and by ``flwr run .`` (where each virtual SuperNode finds its
site here by its partition id), so both run the same sites through the same loading code as real data.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock

from ..data.site_config import user_data_dir
from .partition import split_dataset
from .phantoms import generate_phantoms

DEMO_MODALITIES = ("ct", "mri", "us")
_COMPLETE = ".complete"


def make_demo_sites(root: str | Path, num_cases: int = 16, seed: int = 0) -> list[Path]:
    """Write one phantom dataset and one site YAML per demo modality under ``root``; return the YAMLs."""
    root = Path(root)
    yamls = []
    for i, modality in enumerate(DEMO_MODALITIES):
        data = generate_phantoms(root / "data" / modality, modality, num_cases=num_cases, seed=seed + i)
        yamls += split_dataset(
            data, modality, 1, "iid", seed, root / "sites" / modality, site_prefix=f"demo_{modality}"
        )
    (root / _COMPLETE).write_text("\n".join(str(p) for p in yamls))
    return yamls


def default_demo_root() -> Path:
    """Where ``flwr run .``'s virtual nodes generate the demo: ``$XDG_DATA_HOME/fed_swinumamba/demo``."""
    return user_data_dir() / "demo"


def demo_site(root: str | Path, partition_id: int) -> Path:
    """The site YAML that virtual node ``partition_id`` plays, generating the demo once if needed.

    Several ClientApp processes ask at the same time on a first run; a file lock lets one of them
    generate while the others wait, and a marker file says the demo is complete.
    """
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        marker = root / _COMPLETE
        yamls = [Path(p) for p in marker.read_text().split()] if marker.is_file() else make_demo_sites(root)
    return yamls[partition_id % len(yamls)]
