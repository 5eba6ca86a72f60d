import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: A RepUX-Net / 3D UX-Net small enough for CPU tests at 32^3.
TINY = dict(depths=(1, 1, 1, 1), feat_size=(4, 8, 16, 32), hidden_size=32, ks=5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
