import numpy as np
import pytest
from scipy import ndimage

from diffad.metrics import aupro, auroc, evaluate_maps, f1_max, pro_curve


@pytest.fixture()
def masks():
    m = np.zeros((4, 24, 24), bool)
    m[0, 2:8, 3:9] = True
    m[1, 15:22, 15:19] = True
    m[1, 1:3, 1:3] = True  # two regions in one image
    m[2, 10:12, 4:20] = True
    return m


def test_perfect_and_inverted_maps(masks):
    noise = np.random.default_rng(0).random(masks.shape) * 0.1
    perfect = masks + noise
    assert auroc(masks, perfect) == 1.0
    assert auroc(masks, -perfect) == 0.0
    assert f1_max(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, -perfect) == pytest.approx(0.0, abs=1e-9)


def brute_force_pro(masks, maps, threshold):
    overlaps = []
    for mask, amap in zip(masks, maps):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for k in range(1, count + 1):
            region = labelled == k
            overlaps.append(np.mean(amap[region] >= threshold))
    fpr = np.mean(maps[~masks] >= threshold)
    return fpr, np.mean(overlaps)


def test_pro_curve_matches_brute_force(masks):
    maps = np.random.default_rng(1).random(masks.shape) + masks * 0.5
    fpr, pro, thresholds = pro_curve(masks, maps)
    assert np.all(np.diff(fpr) >= 0) and fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    for threshold in maps.ravel()[[5, 500, 1000, 2000]]:
        bf_fpr, bf_pro = brute_force_pro(masks, maps, threshold)
        i = int(np.flatnonzero(thresholds == threshold)[0])
        assert fpr[i] == pytest.approx(bf_fpr)
        assert pro[i] == pytest.approx(bf_pro)


def test_aupro_matches_brute_force_integration(masks):
    maps = np.random.default_rng(2).random(masks.shape) + masks * 0.7
    thresholds = np.unique(maps)[::-1]
    points = [(0.0, 0.0)] + [brute_force_pro(masks, maps, t) for t in thresholds]
    fpr, pro = map(np.array, zip(*points))
    keep = fpr <= 0.3
    x, y = fpr[keep], pro[keep]
    j = keep.sum()
    y_end = y[-1] + (pro[j] - y[-1]) * (0.3 - x[-1]) / (fpr[j] - x[-1])
    expected = np.trapezoid(np.r_[y, y_end], np.r_[x, 0.3]) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, rel=1e-6)
    assert 0.3 < expected < 1.0


def test_evaluate_maps_and_undefined_cases(masks):
    labels = masks.reshape(4, -1).any(axis=1)
    result = evaluate_maps(labels, labels.astype(float), masks, masks.astype(float))
    assert result["image_auroc"] == 1.0 and result["pixel_auroc"] == 1.0 and result["anomalous_images"] == 3
    assert np.isnan(auroc([0, 0], [0.1, 0.2]))
    with pytest.raises(ValueError, match="differ in shape"):
        pro_curve(masks, masks[:, :10])


def test_validation_split_takes_a_seeded_fifth_of_every_defect_type():
    from diffad.evaluate import validation_split

    defects = ["good"] * 10 + ["crack"] * 5 + ["hole"]
    split = validation_split(defects)
    picked = np.asarray(defects)[split]
    assert sorted(picked) == ["crack", "good", "good", "hole"]  # a rare type still gets one image
    assert np.array_equal(split, validation_split(defects))
    assert any(not np.array_equal(split, validation_split(defects, seed=s)) for s in range(1, 5))
