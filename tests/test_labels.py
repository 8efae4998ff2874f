from __future__ import annotations

import numpy as np
import pytest

from maisi_core.anatomy import labels
from maisi_core.errors import LabelMapError, LabelNameError


def test_label_dictionary_has_132_ids_plus_body():
    d = labels.label_dict()
    assert len(d) == 133 and d["body"] == 200 and d["liver"] == 1 and d["airway"] == 132
    assert labels.dummy_ids() == (2, 16, 18, 20, 21, 129, 130, 131)
    assert 2 not in labels.known_ids() and 0 in labels.known_ids() and 200 in labels.known_ids()


def test_name_id_lookups_both_ways():
    assert labels.label_id("Right_Kidney") == 5
    assert labels.label_id("vertebrae L5") == 33 and labels.label_id("VERTEBRAE_S1") == 127
    assert labels.label_name(14) == "left kidney"
    assert labels.label_name(0) == "background"


def test_unknown_name_gets_did_you_mean():
    with pytest.raises(LabelNameError, match=r"but got name='spleeen'\. Did you mean 'spleen'\?"):
        labels.label_id("spleeen")


def test_dummy_id_has_no_name():
    with pytest.raises(LabelNameError, match=r"but got label=16\."):
        labels.label_name(16)


def test_regions_aliases_and_markers():
    assert labels.normalize_region("Thorax") == "chest"
    assert labels.region_index("pelvis") == 3
    with pytest.raises(LabelNameError, match=r"but got region='abdomn'\. Did you mean 'abdomen'\?"):
        labels.normalize_region("abdomn")
    lm = np.zeros((4, 4, 4), np.uint8)
    lm[0, 0, 0], lm[1, 1, 1] = 30, 1
    assert labels.regions_in_label_map(lm) == ("chest", "abdomen")


def test_check_label_map_accepts_valid_map(label_map):
    labels.check_label_map(label_map, expected_shape=(32, 32, 32))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m[..., 0], r"expects a 3D label map \(X, Y, Z\), but got shape=\(32, 32\)"),
        (lambda m: np.where(m == 1, 16, m), r"but got unknown ids=\[16\]"),
        (lambda m: np.where(m == 1, 300, m.astype(np.uint16)), r"IDs in 0\.\.255 .* but got ids=\[300\]"),
        (lambda m: np.where(m == 200, 0, m), r"expects the body label 200 .* Pass fix_body=True"),
        (lambda m: m.astype(np.float32) + 0.5, r"expects integer label IDs, but got dtype=float32"),
    ],
)
def test_check_label_map_errors(label_map, mutate, message):
    with pytest.raises(LabelMapError, match=message):
        labels.check_label_map(mutate(label_map))


def test_check_label_map_wrong_shape(label_map):
    with pytest.raises(LabelMapError, match=r"output size \(64, 64, 64\), but got shape=\(32, 32, 32\)"):
        labels.check_label_map(label_map, expected_shape=(64, 64, 64))


def test_add_body_label_fills_envelope_between_organs():
    lm = np.zeros((20, 20, 6), np.uint8)
    lm[4:8, 4:16, :] = 1
    lm[12:16, 4:16, :] = 3
    lm[4:16, 4:6, :] = 62
    lm[4:16, 14:16, :] = 62
    out = labels.add_body_label(lm)
    assert (out[9:11, 8:12, :] == 200).all()  # the hole between the organs is body now
    assert out[0, 0, 0] == 0  # outside stays background
    assert np.array_equal(out[lm > 0], lm[lm > 0])  # organs untouched


def test_remove_tumors_relabels_to_host(label_map):
    lm = label_map.copy()
    lm[9:11, 9:11, 9:11] = 26  # hepatic tumour inside the liver
    lm[17:19, 17:19, 21:23] = 23  # lung tumour inside the lung lobe
    out = labels.remove_tumors(lm)
    assert labels.tumor_ids_in(out) == ()
    assert (out[9:11, 9:11, 9:11] == 1).all() and (out[17:19, 17:19, 21:23] == 28).all()
