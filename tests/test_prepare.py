"""``fastmaskformer prepare``: tiny raw inputs in each release's own format -> the outputs the
official scripts write, checked value by value; idempotence, resume, bad --src."""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fastmaskformer.cli import main
from fastmaskformer.data.prepare import PrepareError, prepare
from fastmaskformer.data.prepare._common import ade20k_tables
from fastmaskformer.data.prepare.ade20k_panoptic import rle_encode

cv2 = pytest.importorskip("cv2")


def _rng(seed=0):
    return np.random.default_rng(seed)


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _jpeg(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = _rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------- ADE20K-Full
FULL_IDS = ade20k_tables()["full_847_object_ids"]


def _ade_full_raw(src: Path):
    """index + 3 images: a small training one, a large one (resized), a validation one."""
    base = src / "ADE20K_2021_17_01"
    specs = [("ADE_train_00000001.jpg", "images/ADE/training/home", 30, 40),
             ("ADE_train_00000002.jpg", "images/ADE/training/urban", 520, 600),
             ("ADE_val_00000001.jpg", "images/ADE/validation/home", 700, 530)]
    known = [FULL_IDS[0], FULL_IDS[1], FULL_IDS[846], FULL_IDS[400]]
    unknown = [0, 5, 6655]  # no class / not among the 847
    raw = {}
    for k, (name, folder, h, w) in enumerate(specs):
        image = _jpeg(src / "ADE20K_2021_17_01" / folder / name, h, w, k)
        classes = _rng(10 + k).choice(known + unknown, size=(h, w)).astype(np.int32)
        seg = np.zeros((h, w, 3), np.uint8)
        seg[..., 0] = (classes // 256) * 10 + _rng(20 + k).integers(0, 10, (h, w))  # R // 10 is the high byte
        seg[..., 1] = classes % 256
        seg[..., 2] = 7  # instance channel, ignored
        Image.fromarray(seg).save(src / "ADE20K_2021_17_01" / folder / name.replace(".jpg", "_seg.png"))
        raw[name] = (image, classes)
    index = {"filename": [s[0] for s in specs], "folder": [f"ADE20K_2021_17_01/{s[1]}" for s in specs],
             "objectPresence": np.zeros((3, 3), np.int64)}
    with open(base / "index_ade20k.pkl", "wb") as f:
        pickle.dump(index, f)
    return raw


def _official_full(image: np.ndarray, classes: np.ndarray):
    """The official script's steps written out: resize rule, then the per-id loop."""
    h, w = image.shape[:2]
    if w >= h > 512:
        size = (round(w / float(h) * 512), 512)
    elif h >= w > 512:
        size = (512, round(h / float(w) * 512))
    else:
        size = None
    if size:
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        classes = cv2.resize(classes, size, interpolation=cv2.INTER_NEAREST)
    label = np.zeros(classes.shape, np.uint16) + 65535
    for value in np.unique(classes):
        if value in FULL_IDS:
            label[classes == value] = FULL_IDS.index(value)
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, format="JPEG")
    tif = io.BytesIO()
    Image.fromarray(label).save(tif, format="TIFF")
    return jpeg.getvalue(), tif.getvalue(), label


def test_ade20k_full(tmp_path):
    src, root = tmp_path / "raw", tmp_path / "datasets"
    raw = _ade_full_raw(src)
    prepare("ade20k-full-847", src, root, jobs=2, progress=False)
    out = root / "ADE20K_2021_17_01"
    for name, (image, classes) in raw.items():
        split = "validation" if "_val_" in name else "training"
        jpeg, tif, label = _official_full(image, classes)
        out_jpg = out / "images_detectron2" / split / name
        out_tif = out / "annotations_detectron2" / split / name.replace(".jpg", ".tif")
        assert out_jpg.read_bytes() == jpeg
        assert out_tif.read_bytes() == tif
        stored = Image.open(out_tif)
        assert stored.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(stored), label)
    assert Image.open(out / "images_detectron2/training/ADE_train_00000002.jpg").size == (591, 512)
    assert Image.open(out / "images_detectron2/validation/ADE_val_00000001.jpg").size == (512, 676)
    assert 65535 in np.asarray(Image.open(out / "annotations_detectron2/training/ADE_train_00000001.tif"))

    # idempotent: nothing rewritten; resume: a removed output comes back identical
    before = _files(root)
    prepare("ade20k-full-847", src, root, jobs=1, progress=False)
    assert _files(root) == before
    victim = out / "annotations_detectron2/training/ADE_train_00000002.tif"
    data = victim.read_bytes()
    victim.unlink()
    prepare("ade20k-full-847", src, root, jobs=1, progress=False)
    assert victim.read_bytes() == data

    # the loader reads the result
    from fastmaskformer.config import get_config
    from fastmaskformer.data import build_dataset

    cfg = get_config("ade20k-full-847-r50").data
    cfg.root = str(root)
    ds = build_dataset(cfg, "val", train=False)
    assert len(ds) == 1 and ds[0]["sem_seg"].shape == (676, 512)
    assert set(np.unique(ds[0]["sem_seg"].numpy())) <= {0, 1, 400, 846, 65535}


def test_ade20k_full_failure_leaves_no_partial_file(tmp_path):
    src, root = tmp_path / "raw", tmp_path / "datasets"
    _ade_full_raw(src)
    bad = src / "ADE20K_2021_17_01/images/ADE/training/urban/ADE_train_00000002_seg.png"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # truncated download
    with pytest.raises(PrepareError, match="ADE_train_00000002_seg.png"):
        prepare("ade20k-full-847", src, root, jobs=1, progress=False)
    names = [p.name for p in root.rglob("*") if p.is_file()]
    assert not [n for n in names if n.startswith(".")], names  # no temporary file left
    assert "ADE_train_00000002.tif" not in names and "ADE_train_00000001.tif" in names
    bad.write_bytes(good)
    prepare("ade20k-full-847", src, root, jobs=1, progress=False)
    assert len([p for p in root.rglob("*.tif")]) == 3


def test_prepare_bad_src_is_one_line(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    assert main(["prepare", "ade20k-full-847", "--src", str(tmp_path / "raw"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ADE20K_2021_17_01" in err and "not found" in err
    _ade_full_raw(tmp_path / "raw")
    os.remove(tmp_path / "raw/ADE20K_2021_17_01/images/ADE/training/home/ADE_train_00000001.jpg")
    assert main(["prepare", "ade20k-full-847", "--src", str(tmp_path / "raw"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ADE_train_00000001.jpg" in err
    for name in ("cityscapes", "coco-stuff-10k", "ade20k-panoptic"):
        assert main(["prepare", name, "--src", str(tmp_path / "raw"), "--no-progress"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["prepare", "ade20k-150", "--src", str(tmp_path / "raw")]) == 0
    assert "needs no preparation" in capsys.readouterr().out


# ----------------------------------------------------------------------------- ADE20K panoptic
def _rle_decode(rle: dict) -> np.ndarray:
    """An independent reading of the COCO compressed RLE string."""
    h, w = rle["size"]
    s, counts, p = rle["counts"], [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    flat = np.zeros(h * w, bool)
    pos, val = 0, False
    for c in counts:
        flat[pos: pos + c] = val
        pos += c
        val = not val
    return flat.reshape(w, h).T


def test_rle_encode_known_values():
    assert rle_encode(np.array([[0, 1], [1, 1]], bool)) == {"size": [2, 2], "counts": "13"}
    assert rle_encode(np.array([[1, 1]], bool))["counts"] == "02"
    mask = _rng(3).random((37, 53)) > 0.3
    mask[:, 10:40] = True  # long runs: several 5-bit groups and negative differences
    assert np.array_equal(_rle_decode(rle_encode(mask)), mask)


def _ade_pan_raw(src: Path):
    base = src / "ADEChallengeData2016"
    raw = {}
    for split, names in (("training", ["ADE_train_00000001", "ADE_train_00000002"]), ("validation", ["ADE_val_00000001"])):
        for k, stem in enumerate(names):
            h, w = 24, 32
            _jpeg(base / "images" / split / f"{stem}.jpg", h, w, k)
            sem = np.zeros((h, w), np.uint8)  # 0 = other
            sem[:8] = 1  # wall (stuff)
            sem[8:16] = 3  # sky (stuff)
            sem[16:, :10] = 8  # bed (thing in the semantic map: not pasted as stuff)
            ins = np.zeros((h, w, 3), np.uint8)
            ins[16:, :10, 0], ins[16:, :10, 1] = 1, 1  # bed (instance class 1 -> semantic 8), instance 1
            ins[16:, 12:20, 0], ins[16:, 12:20, 1] = 1, 2  # a second bed
            ins[4:12, 22:30, 0], ins[4:12, 22:30, 1] = 4, 3  # person (4 -> 13) over wall and sky
            for folder, arr in (("annotations", sem), ("annotations_instance", ins)):
                (base / folder / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(base / folder / split / f"{stem}.png")
            raw[stem] = (sem, ins)
    return raw


def test_ade20k_panoptic(tmp_path):
    src, root = tmp_path / "raw", tmp_path / "datasets"
    raw = _ade_pan_raw(src)
    prepare("ade20k-panoptic", src, root, jobs=1, progress=False)
    out = root / "ADEChallengeData2016"
    tables = ade20k_tables()
    pan = json.loads((out / "ade20k_panoptic_train.json").read_text())
    assert list(pan) == ["images", "annotations", "categories"]
    assert pan["images"][0] == {"id": "ADE_train_00000001", "file_name": "ADE_train_00000001.jpg", "width": 32, "height": 24}
    cats = pan["categories"]
    assert len(cats) == 150 and cats[8]["name"] == "window " and cats[48]["color"] == [140, 140, 200]
    assert cats[7] == {"name": "bed", "id": 7, "isthing": 1, "color": [204, 5, 255]} and cats[0]["isthing"] == 0
    assert sum(c["isthing"] for c in cats) == 100
    for ann in pan["annotations"]:
        stem = ann["image_id"]
        sem, ins = raw[stem]
        split = "training" if "train" in stem else "validation"
        np.testing.assert_array_equal(np.asarray(Image.open(out / "annotations_detectron2" / split / f"{stem}.png")),
                                      sem - np.uint8(1))
        rgb8 = np.asarray(Image.open(out / "ade20k_panoptic_train" / ann["file_name"]))
        buf = io.BytesIO()
        Image.fromarray(rgb8).save(buf, format="PNG")  # the official call on the same array
        assert (out / "ade20k_panoptic_train" / ann["file_name"]).read_bytes() == buf.getvalue()
        rgb = rgb8.astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        segs = ann["segments_info"]
        assert [s["category_id"] for s in segs] == [0, 2, 7, 7, 12]
        wall, sky, bed1, bed2, person = segs
        assert wall["id"] == 120 + 256 * 120 + 65536 * 120 and wall["area"] == 8 * 32 and wall["bbox"] == [0, 0, 32, 8]
        assert bed1["id"] == 204 + 256 * 5 + 65536 * 255  # first instance: the class colour
        c2 = [bed2["id"] % 256, bed2["id"] // 256 % 256, bed2["id"] // 65536]
        assert bed2["id"] != bed1["id"] and all(abs(a - b) <= 30 for a, b in zip(c2, [204, 5, 255]))
        assert person["area"] == 64 and person["bbox"] == [22, 4, 8, 8]
        assert wall["area"] == 256  # stuff area before the instances are pasted (official)
        assert np.all(ids[4:12, 22:30] == person["id"]) and np.all(ids[16:, 12:20] == bed2["id"])
        assert np.all(ids[16:, 10:12] == 0)  # "other" stays void
        assert all(s["iscrowd"] == 0 for s in segs)
    inst = json.loads((out / "ade20k_instance_train.json").read_text())
    assert list(inst) == ["images", "categories", "annotations"]
    assert inst["categories"][0] == {"id": 7, "name": tables["instance_100"][0][2]} and len(inst["categories"]) == 100
    anns = inst["annotations"]
    assert [a["id"] for a in anns] == list(range(1, 7)) and [a["category_id"] for a in anns[:3]] == [7, 7, 12]
    assert list(anns[0]) == ["id", "image_id", "iscrowd", "category_id", "bbox", "segmentation", "area"]
    sem, ins = raw["ADE_train_00000001"]
    np.testing.assert_array_equal(_rle_decode(anns[1]["segmentation"]), ins[..., 1] == 2)
    assert anns[1]["bbox"] == [12, 16, 8, 8] and anns[1]["area"] == 64
    assert json.loads((out / "ade20k_panoptic_val.json").read_text())["images"][0]["id"] == "ADE_val_00000001"
    assert not (out / ".fastmaskformer_prepare").exists()

    # random colours follow a per-image seed: a fresh run writes the same bytes
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    root2 = tmp_path / "again"
    prepare("ade20k-panoptic", src, root2, jobs=2, progress=False)
    for p, data in before.items():
        if "images" not in p.parts and "annotations" not in p.parts:
            assert (root2 / p.relative_to(root)).read_bytes() == data, p
    mtimes = _files(root)
    prepare("ade20k-panoptic", src, root, jobs=1, progress=False)
    assert _files(root) == mtimes

    # the panoptic loader reads the output (images through the symlinked raw folders)
    from fastmaskformer.config import get_config
    from fastmaskformer.data import build_dataset

    presets = [p for p in __import__("fastmaskformer").list_presets() if "ade20k-panoptic" in p]
    cfg = get_config(presets[0]).data
    cfg.root = str(root)
    item = build_dataset(cfg, "val", train=False)[0]
    assert item["pan_seg"].shape == (24, 32)


# ----------------------------------------------------------------------------- COCO-Stuff-10K
def test_coco_stuff_10k(tmp_path):
    h5py = pytest.importorskip("h5py")
    from scipy.io import savemat

    src, root = tmp_path / "raw", tmp_path / "datasets"
    base = src / "coco/coco_stuff_10k"
    (base / "imageLists").mkdir(parents=True)
    (base / "annotations").mkdir()
    names = {"train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"], "test": ["COCO_train2014_000000000009"]}
    labels = {}
    for split, split_names in names.items():
        (base / "imageLists" / f"{split}.txt").write_text("\n".join(split_names) + "\n")
        for k, name in enumerate(split_names):
            _jpeg(base / "images" / f"{name}.jpg", 12, 17, k)
            S = _rng(k).integers(0, 183, (12, 17)).astype(np.float64)
            S[0, 0], S[0, 1] = 0, 1  # unlabeled (0 in v1.0 ... 1 after MATLAB's +1)
            labels[name] = S
            if k == 0:  # MATLAB v7.3: HDF5 holding the transposed matrix
                with h5py.File(base / "annotations" / f"{name}.mat", "w") as f:
                    f["S"] = S.T
            else:
                savemat(base / "annotations" / f"{name}.mat", {"S": S})
    prepare("coco-stuff-10k", src, root, jobs=1, progress=False)
    out = root / "coco/coco_stuff_10k"
    for split, split_names in names.items():
        for name in split_names:
            assert (out / "images_detectron2" / split / f"{name}.jpg").read_bytes() == (base / "images" / f"{name}.jpg").read_bytes()
            png = Image.open(out / "annotations_detectron2" / split / f"{name}.png")
            assert png.mode == "L"
            expected = labels[name].astype(np.uint8) - np.uint8(2)
            np.testing.assert_array_equal(np.asarray(png), expected)
            buf = io.BytesIO()
            Image.fromarray(expected).save(buf, format="PNG")
            assert (out / "annotations_detectron2" / split / f"{name}.png").read_bytes() == buf.getvalue()
            assert np.asarray(png)[0, 1] == 255
    before = _files(root)
    prepare("coco-stuff-10k", src, root, jobs=2, progress=False)
    assert _files(root) == before


# ----------------------------------------------------------------------------- Cityscapes
def test_cityscapes(tmp_path):
    src, root = tmp_path / "raw", tmp_path / "datasets"
    base = src / "cityscapes"
    objects = [
        {"label": "road", "polygon": [[0, 10], [39, 10], [39, 29], [0, 29]]},
        {"label": "cargroup", "polygon": [[5, 12], [15, 12], [15, 20], [5, 20]]},  # -> car (13)
        {"label": "person", "polygon": [[20, 0], [30, 0], [30, 8]], "deleted": 1},  # skipped
        {"label": "license plate", "polygon": [[6, 14], [9, 14], [9, 16]]},  # id -1: not drawn
        {"label": "sky", "polygon": [[0, 0], [39, 0], [39, 5], [0, 5]]},
        {"label": "rail track", "polygon": [[30, 20], [35, 20], [35, 25], [30, 25]]},  # train id 255
    ]
    for split, city in (("train", "aachen"), ("val", "lindau")):
        folder = base / "gtFine" / split / city
        folder.mkdir(parents=True)
        (folder / f"{city}_000000_000019_gtFine_polygons.json").write_text(
            json.dumps({"imgHeight": 30, "imgWidth": 40, "objects": objects}))
        _jpeg(base / "leftImg8bit" / split / city / f"{city}_000000_000019_leftImg8bit.jpg", 30, 40, 0)
    prepare("cityscapes", src, root, jobs=1, progress=False)
    out = root / "cityscapes/gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    png = Image.open(out)
    assert png.mode == "L" and png.size == (40, 30)
    lab = np.asarray(png)
    assert lab[7, 20] == 255 and lab[25, 2] == 0 and lab[16, 10] == 13 and lab[15, 8] == 13
    assert lab[2, 25] == 10 and lab[22, 32] == 255 and lab[3, 25] == 10
    expected = Image.new("L", (40, 30), 255)
    draw = ImageDraw.Draw(expected)
    for obj, tid in zip(objects, (0, 13, None, None, 10, 255)):
        if tid is not None:
            draw.polygon([tuple(p) for p in obj["polygon"]], fill=tid)
    buf = io.BytesIO()
    expected.save(buf, format="PNG")
    assert out.read_bytes() == buf.getvalue()
    assert (root / "cityscapes/gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png").is_file()
    assert (root / "cityscapes/leftImg8bit").is_symlink()
    bad = base / "gtFine/val/lindau/lindau_000000_000019_gtFine_polygons.json"
    bad.write_text(json.dumps({"imgHeight": 30, "imgWidth": 40, "objects": [{"label": "dragon", "polygon": [[0, 0], [1, 1], [0, 1]]}]}))
    (root / "cityscapes/gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(PrepareError, match="unknown label 'dragon'"):
        prepare("cityscapes", src, root, jobs=1, progress=False)


def test_prepare_cli_into_another_root(tmp_path, capsys):
    src, root = tmp_path / "raw", tmp_path / "datasets"
    _ade_pan_raw(src)
    rc = main(["prepare", "ade20k-panoptic", "--src", str(src), "--root", str(root), "--jobs", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "prepared ade20k-panoptic" in capsys.readouterr().out
    out = root / "ADEChallengeData2016"
    assert (out / "images").is_symlink() and (out / "ade20k_instance_val.json").is_file()
    assert not (src / "ADEChallengeData2016" / "ade20k_panoptic_train.json").exists()  # the raw folder is untouched
    assert main(["prepare", "ade20k-panoptic", "--src", str(src), "--jobs", "0"]) == 2


def test_unwritable_output_is_one_line(tmp_path, capsys):
    src = tmp_path / "raw"
    _ade_full_raw(src)
    blocker = tmp_path / "datasets"
    blocker.mkdir()
    (blocker / "ADE20K_2021_17_01").write_text("a file where a folder belongs")
    assert main(["prepare", "ade20k-full-847", "--src", str(src), "--root", str(blocker), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write into" in err


def test_src_may_name_the_release_folder(tmp_path):
    src = tmp_path / "raw"
    _ade_pan_raw(src)
    prepare("ade20k-panoptic", src / "ADEChallengeData2016", None, jobs=1, progress=False)
    assert (src / "ADEChallengeData2016" / "ade20k_panoptic_val.json").is_file()  # in place, as the official scripts
