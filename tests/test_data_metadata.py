"""Packaged class metadata: sizes, thing/stuff splits and spot checks of the facts."""
import pytest

from fastmaskformer.data import DatasetError, get_metadata, list_metadata

EXPECTED = {  # name: (classes, things, ignore label)
    "ade20k-150": (150, 100, 255),
    "ade20k-panoptic-150": (150, 100, 255),
    "ade20k-full-847": (847, 0, 65535),
    "coco-stuff-171": (171, 80, 255),
    "cityscapes-19": (19, 8, 255),
    "mapillary-65": (65, 37, 65),
    "coco-panoptic-133": (133, 80, 255),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sizes_and_schema(name):
    meta = get_metadata(name)
    k, things, ignore = EXPECTED[name]
    assert meta.num_classes == k and len(meta.thing_classes) == things and meta.ignore_label == ignore
    assert len(set(meta.dataset_ids)) == k and len(meta.colors) == k
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in meta.colors)
    assert all(name.strip() == name and name for name in meta.class_names)


def test_spot_checks():
    ade = get_metadata("ade20k-150")
    assert ade.class_names[:3] == ("wall", "building", "sky") and ade.class_names[149] == "flag"
    assert ade.colors[0] == (120, 120, 120) and ade.isthing[12]  # person
    full = get_metadata("ade20k-full-847")
    assert full.class_names[0] == "wall" and full.class_names[846] == "adding machine, totalizer, totaliser"
    coco = get_metadata("coco-panoptic")
    assert coco.category_map[1] == 0 and coco.category_map[200] == 132
    assert coco.dataset_ids[79] == 90 and not coco.isthing[80]
    stuff = get_metadata("coco-stuff-10k")
    assert stuff.dataset_ids[80] == 92 and stuff.class_names[-1] == "wood"
    city = get_metadata("cityscapes")
    assert city.class_names[0] == "road" and city.class_names[18] == "bicycle" and city.colors[13] == (0, 0, 142)
    mapillary = get_metadata("mapillary")
    assert mapillary.class_names[0] == "Bird" and mapillary.class_names[64] == "Ego Vehicle"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset metadata"):
        get_metadata("pascal")
    with pytest.raises(DatasetError, match="synthetic_metadata.json not found"):
        get_metadata("synthetic-semantic", tmp_path)
    assert "ade20k-150" in list_metadata()
