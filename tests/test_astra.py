"""The optional Astra/Merlin I3ResNet-152 extractor: architecture always, weights when installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maisi_core.evaluation.astra import ASTRA_FEATURE_DIM, I3ResNet152
from maisi_core.errors import WeightsNotFoundError


def test_i3resnet152_matches_the_astra_state_dict_layout():
    with torch.device("meta"):
        net = I3ResNet152()
    state = net.state_dict()
    assert len(state) == 930  # tensors in the Astra checkpoint (775 float + 155 num_batches_tracked)
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 7, 7)
    assert tuple(state["layer3.35.conv3.weight"].shape) == (1024, 256, 1, 1, 1)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(117.5e6, rel=0.01)


def test_feature_map_downsamples_depth_16_and_plane_32():
    torch.manual_seed(0)
    net = I3ResNet152(blocks=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, 64, 64, 32))
    assert tuple(out.shape) == (1, ASTRA_FEATURE_DIM, 2, 2, 2)


def _extractor():
    from maisi_core.evaluation.astra import AstraFeatureExtractor

    try:
        return AstraFeatureExtractor(input_size=(64, 64, 48))
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.astra
def test_astra_features_separate_ct_from_noise():
    from maisi_core.anatomy.intensity import synthesize_ct
    from maisi_core.anatomy.phantom import PhantomConfig, generate_phantom

    ext = _extractor()
    cases = [generate_phantom(PhantomConfig(output_size_vox=(64, 64, 48), spacing_mm=(6.0, 6.0, 6.0)), seed=s)
             for s in (1, 2)]
    a, b = (ext.extract_volume(synthesize_ct(c.label_map, (6.0,) * 3, seed=i)) for i, c in enumerate(cases))
    noise = ext.extract_volume(np.random.default_rng(0).normal(-500, 400, (64, 64, 48)))

    def cos(x, y):
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    assert a.shape == (ASTRA_FEATURE_DIM,)
    assert cos(a, b) > cos(a, noise) + 0.1
