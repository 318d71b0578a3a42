"""Every preset in configs/ validates, and the paper presets keep the paper's preprocessing."""
from pathlib import Path

import pytest

from hpc_zsem.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "quality", "paper_fig2_sssc_6x6", "paper_fig4_sssc_11x11", "paper_fig4_gpmm_10x10",
            "paper_fig4_gpmm_20x20", "paper_fig7_sssc_9x9"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_preset_validates(path):
    config = load_config(path)
    if path.stem.startswith("paper_"):
        assert config.input.downsample == 2 and config.input.crop is not None
        size = int(path.stem.rsplit("_", 1)[1].split("x")[0])
        assert tuple(config.patches.size) == (size, size)
        assert config.model.name == path.stem.split("_")[2]
