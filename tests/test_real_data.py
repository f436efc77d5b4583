"""kaviz.data.real: loaders for user-supplied real datasets, on tiny fixture trees (no network)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from fixtures_real import (
    CELEBA_ATTRIBUTES,
    CUB_CLASSES,
    DOG_FOLDERS,
    make_camvid,
    make_celeba,
    make_coco,
    make_cub,
    make_dogs,
    make_nyu,
    make_voc,
    save_jpeg_variant,
    to_crlf,
)
from PIL import Image

from kaviz.data import real
from kaviz.data.real import DatasetLayoutError, JointTransform

IMAGENET_MEAN = torch.tensor(real.IMAGENET_MEAN)[:, None, None]
IMAGENET_STD = torch.tensor(real.IMAGENET_STD)[:, None, None]


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * IMAGENET_STD + IMAGENET_MEAN


# -------------------------------------------------------------------------------------------------
# CUB-200-2011


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub") / "CUB_200_2011"
    return root, make_cub(root)


def test_cub_splits_labels_and_classes(cub):
    root, info = cub
    for split in ("train", "test"):
        ds = real.cub200(root, split=split, image_size=16)
        assert ds.files == ["images/" + p for p, _ in info[split]]
        assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == [c for _, c in info[split]]
        assert ds.classes == [c.split(".", 1)[1] for c in CUB_CLASSES] and ds.num_classes == 3
        x, y = ds[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert y.dim() == 0 and y.dtype == torch.int64 and int(y) == info[split][0][1]
    train, test = real.cub200(root, "train"), real.cub200(root, "test")
    assert not set(train.files) & set(test.files) and len(train) + len(test) == 12


def test_cub_boxes_and_crop_to_box(cub):
    root, info = cub
    ds = real.cub200(root, "train", image_size=16)
    for f, box in zip(ds.files, ds.boxes.tolist()):
        x, y, w, h = info["boxes"][f[len("images/"):]]
        assert box == [x, y, x + w, y + h]
    # The box is a red rectangle on black: cropped, the whole view is red; uncropped it is not.
    cropped = real.cub200(root, "train", image_size=16, crop_to_box=True)
    for i in range(len(cropped)):
        a = cropped.image_array(i)
        assert a.dtype == np.uint8 and a.shape == (16, 16, 3)
        assert a[..., 0].min() > 150 and a[..., 1].max() < 80
        assert ds.image_array(i)[..., 0].min() < 40
    # The cropped item goes through the transform too: un-normalised it is red everywhere.
    x = unnormalise(real.cub200(root, "test", image_size=16, crop_to_box=True)[0][0])
    assert x[0].min() > 0.6 and x[1].max() < 0.3


def test_cub_errors(cub, tmp_path):
    root, _ = cub
    with pytest.raises(DatasetLayoutError, match=r"(?s)CUB-200-2011 not found at .*the folder does not exist.*"
                       r"Expected layout:.*image_class_labels.txt.*kaviz never downloads"):
        real.cub200(tmp_path / "nowhere")
    # root pointing one level above the dataset: the message says where it is.
    parent = tmp_path / "datasets"
    shutil.copytree(root, parent / "CUB_200_2011")
    with pytest.raises(FileNotFoundError, match=r"(?s)missing images.txt.*Did you mean root=.*CUB_200_2011"):
        real.cub200(parent)
    broken = parent / "CUB_200_2011"
    (broken / "train_test_split.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing train_test_split.txt"):
        real.cub200(broken)
    with pytest.raises(ValueError, match=r"unknown split 'val'; valid splits are \['train', 'test'\]"):
        real.cub200(root, split="val")


def test_cub_incomplete_extraction_and_bad_index_files(cub, tmp_path):
    root, info = cub
    copy = tmp_path / "CUB_200_2011"
    shutil.copytree(root, copy)
    victim = info["train"][1][0]
    (copy / "images" / victim).unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 8 listed images are missing \(images/" + victim):
        real.cub200(copy, "train")
    assert len(real.cub200(copy, "train", check_images=False)) == 8  # opting out of the check
    (copy / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(DatasetLayoutError, match=r"image_class_labels.txt and images.txt list different image ids"):
        real.cub200(copy, "test")
    (copy / "bounding_boxes.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="missing bounding_boxes.txt"):
        real.cub200(copy, crop_to_box=True)


# -------------------------------------------------------------------------------------------------
# Stanford Dogs


@pytest.mark.parametrize("lists", ["mat", "txt"])
def test_dogs_lists(tmp_path, lists):
    info = make_dogs(tmp_path, lists=lists)
    for split in ("train", "test"):
        ds = real.stanford_dogs(tmp_path, split, image_size=8)
        assert ds.files == ["Images/" + rel for rel, _ in info[split]]
        assert ds.targets.tolist() == [c for _, c in info[split]]
        assert ds.classes == [f.split("-", 1)[1] for f in DOG_FOLDERS]
        assert ds.boxes is None
        assert ds[len(ds) - 1][0].shape == (3, 8, 8)


def test_dogs_crop_to_union_of_boxes(tmp_path):
    info = make_dogs(tmp_path)
    ds = real.stanford_dogs(tmp_path, "train", image_size=8, crop_to_box=True)
    for rel, box in zip(ds.files, ds.boxes.tolist()):
        assert box == [float(v) for v in info["unions"][rel[len("Images/"):]]]
    two_dogs = ds.files.index("Images/" + info["train"][2][0])
    assert ds.boxes[two_dogs].tolist() == [3.0, 4.0, 25.0, 20.0]
    # The cropped single-dog images are all green.
    a = ds.image_array(0)
    assert a[..., 1].min() > 150 and a[..., 0].max() < 80


def test_dogs_errors(tmp_path):
    make_dogs(tmp_path)
    (tmp_path / "test_list.mat").unlink()
    with pytest.raises(DatasetLayoutError,
                       match=r"(?s)Stanford Dogs not found .*missing test_list.mat \(or test_list.txt\).*Expected "
                       r"layout"):
        real.stanford_dogs(tmp_path, "test")
    # A list that disagrees with the folders (a breed folder was removed) is caught, not mislabelled.
    shutil.rmtree(tmp_path / "Images" / DOG_FOLDERS[0])
    with pytest.raises(DatasetLayoutError, match=r"lists breeds with no folder in Images/"):
        real.stanford_dogs(tmp_path, "train")
    (tmp_path / "Images" / "n00000000-Aardvark_dog").mkdir()  # sorted first: shifts every index
    shutil.copytree(tmp_path / "Images" / DOG_FOLDERS[1], tmp_path / "Images" / DOG_FOLDERS[0])
    with pytest.raises(DatasetLayoutError, match=r"labels that disagree with the sorted Images/ folders"):
        real.stanford_dogs(tmp_path, "train")
    shutil.rmtree(tmp_path / "Annotation")
    with pytest.raises(DatasetLayoutError, match=r"missing Annotation"):
        real.stanford_dogs(tmp_path, "train", crop_to_box=True)


# -------------------------------------------------------------------------------------------------
# VOC2007


def test_voc_labels_and_difficult_flags(tmp_path):
    info = make_voc(tmp_path)
    for split, ids in info["splits"].items():
        ds = real.voc2007(tmp_path, split, image_size=8)
        assert ds.files == [f"JPEGImages/{i}.jpg" for i in ids]
        assert ds.num_classes == 20 and ds.classes[0] == "aeroplane" and ds.classes[-1] == "tvmonitor"
        assert ds.targets["labels"].dtype == torch.float32 and ds.targets["difficult"].dtype == torch.bool
        for row, img_id in enumerate(ids):
            objs = info["objects"][img_id]
            for k, name in enumerate(ds.classes):
                flags = [d for n, d in objs if n == name]
                assert ds.targets["labels"][row, k] == (1.0 if flags else 0.0)
                assert bool(ds.targets["difficult"][row, k]) == (bool(flags) and all(flags))
    ds = real.voc2007(tmp_path, "trainval", image_size=8)
    dog, cat, sofa = (ds.classes.index(c) for c in ("dog", "cat", "sofa"))
    assert ds.targets["difficult"][1, dog] and not ds.targets["difficult"][0, dog]   # only-difficult dog
    assert not ds.targets["difficult"][2, cat] and ds.targets["difficult"][2, sofa]  # one easy cat
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and set(y) == {"labels", "difficult"} and y["labels"].shape == (20,)


def test_voc_errors(tmp_path):
    top, tmp_path = tmp_path, tmp_path / "VOCdevkit" / "VOC2007"
    make_voc(tmp_path)
    # root at the top of the official tar: the VOC2007 folder two levels down is pointed out.
    with pytest.raises(DatasetLayoutError, match=r"(?s)PASCAL VOC2007 not found.*missing JPEGImages.*"
                       r"Did you mean root='[^']*VOCdevkit/VOC2007'\? It holds JPEGImages"):
        real.voc2007(top)
    (
        tmp_path / "Annotations" / "000002.xml").write_text(
            "<annotation><object><name>dragon</name></object></annotation>")
    with pytest.raises(DatasetLayoutError,
                       match=r"Annotations/000002.xml is malformed: it could not be read \(unknown class 'dragon'\)"):
        real.voc2007(tmp_path, "train")
    (tmp_path / "Annotations" / "000002.xml").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 2 listed annotations are missing \(Annotations/000002.xml\)"):
        real.voc2007(tmp_path, "train")
    with pytest.raises(DatasetLayoutError, match=r"missing ImageSets/Main/test.txt"):
        (tmp_path / "ImageSets" / "Main" / "test.txt").unlink()
        real.voc2007(tmp_path, "test")


# -------------------------------------------------------------------------------------------------
# COCO 2014


def test_coco_multilabel(tmp_path):
    info = make_coco(tmp_path, split="val")
    ds = real.coco2014_multilabel(tmp_path, "val", image_size=8)
    # contiguous ids in category-id order: 1 person, 2 bicycle, 3 car, 18 dog
    assert ds.classes == ["person", "bicycle", "car", "dog"] and ds.num_classes == 4
    coco_ids = [1, 2, 3, 18]
    ids = sorted(info["present"])                 # image 99 has no annotation: dropped
    assert ds.files == [f"val2014/{info['files'][i]}" for i in ids]
    expected = torch.tensor([[float(c in info["present"][i]) for c in coco_ids] for i in ids])
    assert torch.equal(ds.targets["labels"], expected)
    assert not ds.targets["difficult"].any() and ds.targets["difficult"].shape == expected.shape
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and torch.equal(y["labels"], expected[0])


def test_coco_errors(tmp_path):
    make_coco(tmp_path, split="val")
    with pytest.raises(DatasetLayoutError, match=r"missing annotations/instances_train2014.json, train2014"):
        real.coco2014_multilabel(tmp_path, "train")
    (tmp_path / "annotations" / "instances_val2014.json").write_text('{"images": []}')
    with pytest.raises(DatasetLayoutError, match=r"is not a COCO instances file"):
        real.coco2014_multilabel(tmp_path, "val")


# -------------------------------------------------------------------------------------------------
# CelebA


@pytest.mark.parametrize("nested", [False, True])
def test_celeba_attributes_and_partition(tmp_path, nested):
    info = make_celeba(tmp_path, nested=nested)
    for split, code in (("train", 0), ("valid", 1), ("test", 2)):
        ds = real.celeba(tmp_path, split, image_size=8)
        rows = [k for k, p in enumerate(info["partition"]) if p == code]
        assert ds.files == ["img_align_celeba/" + info["names"][k] for k in rows]
        assert ds.targets.dtype == torch.int64 and ds.targets.shape == (len(rows), 40)
        assert torch.equal(ds.targets, torch.from_numpy((info["values"][rows] == 1).astype(np.int64)))
        assert ds.classes == CELEBA_ATTRIBUTES and ds.num_classes == 40
    sel = real.celeba(tmp_path, "train", attributes=["Smiling", "Eyeglasses"], image_size=8)
    cols = [CELEBA_ATTRIBUTES.index("Smiling"), CELEBA_ATTRIBUTES.index("Eyeglasses")]
    assert sel.classes == ["Smiling", "Eyeglasses"]
    assert torch.equal(sel.targets, torch.from_numpy((info["values"][:3][:, cols] == 1).astype(np.int64)))
    x, y = sel[2]
    assert y.shape == (2,) and y.dtype == torch.int64 and x.shape == (3, 8, 8)
    assert real.celeba(tmp_path, "train", attributes="Male").classes == ["Male"]


def test_celeba_errors(tmp_path):
    make_celeba(tmp_path)
    with pytest.raises(ValueError, match=r"no attribute 'Smilling'; closest valid names: \['Smiling'"):
        real.celeba(tmp_path, attributes=["Smilling"])
    with pytest.raises(ValueError, match=r"no attribute 'male'; closest valid names: \['Male'"):
        real.celeba(tmp_path, attributes=["male"])
    with pytest.raises(ValueError, match=r"lists \['Male'\] more than once"):
        real.celeba(tmp_path, attributes=["Male", "Young", "Male"])
    attr = tmp_path / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines(keepends=True)
    attr.write_text("".join(lines[:3] + [lines[3].replace(" 1", " 2", 1)] + lines[4:]))  # 000002.jpg
    with pytest.raises(DatasetLayoutError, match=r"the line for 000002.jpg does not hold 40 values of -1/1"):
        real.celeba(tmp_path)
    attr.write_text("".join(lines[:3] + [lines[3].rsplit(" ", 2)[0] + "\n"] + lines[4:]))
    with pytest.raises(DatasetLayoutError, match=r"the line for 000002.jpg does not hold 40 values"):
        real.celeba(tmp_path)
    assert len(real.celeba(tmp_path, "test")) == 2  # the bad line is in another split
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"(?s)CelebA not found .*missing list_eval_partition.txt.*Eval/"):
        real.celeba(tmp_path)


# -------------------------------------------------------------------------------------------------
# NYUv2 and the joint transform


def _check_aligned(x: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor, exact: bool):
    """Mask/depth must still be the thresholded image. With a bilinear image, compare pixels inside
    uniform 5x5 mask neighbourhoods away from the border (bilinear and nearest sampling differ by
    less than one source pixel, and the crop scales by less than 2); with nearest sampling, every pixel."""
    grey = unnormalise(x).mean(0)
    keep = mask != 255
    if not exact:
        m = mask.float()[None, None]
        lo = -torch.nn.functional.max_pool2d(-m, 5, 1, 2)[0, 0]
        hi = torch.nn.functional.max_pool2d(m, 5, 1, 2)[0, 0]
        keep &= lo == hi
        # At the output border the window is cut off and cannot see a transition just outside it.
        keep[:2], keep[-2:], keep[:, :2], keep[:, -2:] = False, False, False, False
        assert keep.float().mean() > 0.2  # the check must cover a real share of the image
    assert torch.equal((grey[keep] > 0.5).long(), mask[keep])
    assert torch.equal(depth[keep], torch.where(mask[keep] == 1, 3.0, 1.0))


def test_nyu_files_targets_and_ignore(tmp_path):
    info = make_nyu(tmp_path)
    ds = real.nyuv2(tmp_path, "train", image_size=32, augment=False)
    assert ds.files == [f"train/image/{s}.png" for s, *_ in info["train"]]  # numeric order 0, 5, 10
    assert ds.targets is None and ds.num_classes == 13 and ds.classes[0] == "bed"
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and set(y) == {"mask", "depth"}
    assert y["mask"].dtype == torch.int64 and y["depth"].dtype == torch.float32
    stem, img, mask, depth = info["train"][0]
    assert torch.equal(y["mask"], torch.from_numpy(np.where(mask < 0, 255, mask)))  # -1 -> 255
    assert (y["mask"][:8, :8] == 255).all()
    assert torch.equal(y["depth"], torch.from_numpy(depth))
    assert len(real.nyuv2(tmp_path, "test")) == 2


@pytest.mark.parametrize("seg_format,depth_format", [("npy", "png"), ("png", "npy")])
def test_nyu_storage_formats(tmp_path, seg_format, depth_format):
    info = make_nyu(tmp_path, seg_format=seg_format, depth_format=depth_format)
    ds = real.nyuv2(tmp_path, "train", augment=False, image_size=32)
    maps = ds.maps(0)
    _, _, mask, depth = info["train"][0]
    assert torch.equal(maps["mask"], torch.from_numpy(np.where(mask < 0, 255, mask)))
    assert torch.allclose(maps["depth"], torch.from_numpy(depth))  # png in mm -> metres


def test_nyu_joint_transform_keeps_alignment(tmp_path):
    make_nyu(tmp_path, n_train=2)
    exact = real.nyuv2(tmp_path, "train", image_size=24, transform=JointTransform(24, interpolation="nearest"))
    default = real.nyuv2(tmp_path, "train", image_size=24)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        for i in range(len(exact)):
            x, y = exact[i]
            _check_aligned(x, y["mask"], y["depth"], exact=True)
            seen.add(tuple(y["mask"].flatten().tolist()))
            x, y = default[i]
            _check_aligned(x, y["mask"], y["depth"], exact=False)
    assert len(seen) > 10  # the crops and flips really varied


def test_joint_transform_flip_and_inputs():
    g = torch.zeros(3, 8, 8, dtype=torch.uint8)
    g[:, :, :2] = 255                      # white left edge
    mask = (g[0] > 0).long()
    t = JointTransform(8, scale=(1.0, 1.0), normalize=False)
    flipped = 0
    torch.manual_seed(1)
    for _ in range(20):
        x, y = t(g, {"mask": mask, "depth": mask.float().numpy()})
        assert torch.equal((x[0] > 0.5).long(), y["mask"]) and torch.equal(y["depth"], y["mask"].float())
        flipped += int(y["mask"][:, -1].all())
    assert 0 < flipped < 20
    # Evaluation geometry with a non-square size never pads: the label-0 border would be invented.
    ev = JointTransform((6, 12), train=False, normalize=False)
    img = Image.fromarray(np.full((10, 10, 3), 255, np.uint8))
    x, y = ev(img, {"mask": torch.ones(10, 10, dtype=torch.long)})
    assert x.shape == (3, 6, 12) and (y["mask"] == 1).all() and x.min() > 0.99
    assert ev(img).shape == (3, 6, 12)
    with pytest.raises(ValueError, match=r"map 'mask' has shape \(4, 4\) but the image is \(10, 10\)"):
        ev(img, {"mask": torch.zeros(4, 4)})
    # a whole scene target: per-image entries pass through untouched
    labels = torch.tensor([1.0, 0.0, 1.0])
    x, y = ev(torch.rand(3, 10, 10), {"mask": torch.ones(10, 10, dtype=torch.long), "labels": labels})
    assert y["labels"] is labels and y["mask"].shape == (6, 12) and x.dtype == torch.float32


def test_nyu_errors(tmp_path):
    make_nyu(tmp_path, n_train=2)
    (tmp_path / "train" / "depth" / "5.npy").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 image file\(s\) without a depth \(e.g. \['5'\]\)"):
        real.nyuv2(tmp_path, "train")
    shutil.rmtree(tmp_path / "test" / "seg13")
    with pytest.raises(DatasetLayoutError, match=r"(?s)NYUv2 not found .*missing test/seg13.*train/seg13/0.png"):
        real.nyuv2(tmp_path, "test")
    # a map stored in the 0 = void, 1..13 convention is caught, with the fix
    other = tmp_path / "other"
    make_nyu(other, n_train=1, n_test=1)
    Image.fromarray(np.full((32, 32), 13, np.uint8), "L").save(other / "train" / "seg13" / "0.png")
    ds = real.nyuv2(other, "train")
    with pytest.raises(DatasetLayoutError,
                       match=r"0.png: label values \[13\] are neither classes 0..12 .*zero_is_void=True"):
        ds[0]
    shifted = real.nyuv2(other, "train", zero_is_void=True).maps(0)["mask"]
    assert (shifted == 12).all()
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(other / "train" / "seg13" / "0.png")
    with pytest.raises(DatasetLayoutError,
                       match=r"mask train/seg13/0.png is \(16, 16\) .* image train/image/0.png is \(32, 32\)"):
        real.nyuv2(other, "train")[0]


# -------------------------------------------------------------------------------------------------
# CamVid


def test_camvid_void_to_ignore(tmp_path):
    info = make_camvid(tmp_path)
    for split in ("train", "val", "test"):
        ds = real.camvid(tmp_path, split, image_size=(12, 16), augment=False)
        assert len(ds) == len(info[split]) and ds.num_classes == 11 and ds.classes[-1] == "Bicyclist"
        x, y = ds[0]
        assert set(y) == {"mask"} and x.shape == (3, 12, 16)
        ann = torch.from_numpy(info[split][0][1].astype(np.int64))
        assert torch.equal(y["mask"], torch.where(ann == 11, 255, ann))
        assert (y["mask"] == 255).any() and y["mask"][y["mask"] != 255].max() == 10


def test_camvid_errors(tmp_path):
    make_camvid(tmp_path)
    shutil.rmtree(tmp_path / "valannot")
    with pytest.raises(DatasetLayoutError, match=r"(?s)CamVid not found .*missing valannot.*trainannot/"):
        real.camvid(tmp_path, "val")
    Image.fromarray(np.full((12, 16), 12, np.uint8), "L").save(tmp_path / "testannot" / "0001TP_000000.png")
    with pytest.raises(DatasetLayoutError, match=r"label values \[12\] are neither classes 0..10 nor void \[11, 255\]"):
        real.camvid(tmp_path, "test")[0]


# -------------------------------------------------------------------------------------------------
# Shared behaviour: transforms, fingerprints, subsets, registry, DataLoader


def test_default_transforms_and_augment_flag(cub):
    root, _ = cub
    train, test = real.cub200(root, "train", image_size=16), real.cub200(root, "test", image_size=16)
    assert "RandomResizedCrop" in repr(train.transform) and "scale=(0.5, 1.0)" in repr(train.transform)
    assert "RandomHorizontalFlip" in repr(train.transform) and "Random" not in repr(test.transform)
    assert "Normalize(mean=[0.485, 0.456, 0.406]" in repr(test.transform)
    plain = real.cub200(root, "train", image_size=16, augment=False)
    assert repr(plain.transform) == repr(test.transform)
    assert torch.equal(plain[0][0], plain[0][0])  # the eval transform is deterministic
    custom = real.cub200(root, "train", transform=lambda im: torch.zeros(1))
    assert torch.equal(custom[0][0], torch.zeros(1))


def test_fingerprints(cub, tmp_path):
    root, _ = cub
    a = real.cub200(root, "train", image_size=16)
    assert len(a.fingerprint) == 64 and a.fingerprint == real.cub200(root, "train", image_size=16).fingerprint
    others = [real.cub200(root, "test", image_size=16), real.cub200(root, "train", image_size=32),
              real.cub200(root, "train", image_size=16, augment=False),
              real.cub200(root, "train", image_size=16, crop_to_box=True)]
    fps = {a.fingerprint} | {o.fingerprint for o in others}
    assert len(fps) == 5
    make_celeba(tmp_path)
    assert (real.celeba(tmp_path, attributes=["Male"]).fingerprint
            != real.celeba(tmp_path, attributes=["Young"]).fingerprint)


def test_subset(cub):
    root, info = cub
    ds = real.cub200(root, "train", image_size=16)
    sub = ds.subset([5, 0, 2])
    assert type(sub) is type(ds) and len(sub) == 3 and len(ds) == 8
    assert sub.files == [ds.files[5], ds.files[0], ds.files[2]]
    assert sub.targets.tolist() == [ds.targets[5], ds.targets[0], ds.targets[2]]
    assert torch.equal(sub.boxes, ds.boxes[[5, 0, 2]])
    assert int(sub[0][1]) == int(ds.targets[5])
    plain = real.cub200(root, "train", image_size=16, augment=False)
    assert torch.equal(plain.subset([5, 0, 2])[0][0], plain[5][0])
    assert sub.fingerprint != ds.fingerprint and sub.fingerprint == ds.subset([5, 0, 2]).fingerprint
    assert sub.fingerprint != ds.subset([0, 5, 2]).fingerprint
    assert ds.subset(slice(None)).fingerprint == ds.fingerprint  # the same items: the same data
    mask = ds.targets == 1
    assert ds.subset(mask).targets.tolist() == [1] * int(mask.sum())
    assert len(ds.subset(torch.tensor([1, 2]))) == 2 and len(ds.subset(slice(0, 4))) == 4
    with pytest.raises(IndexError, match=r"indices \[8\] out of range for a dataset of 8 items"):
        ds.subset([1, 8])
    with pytest.raises(TypeError, match=r"1-D sequence of int indices or a boolean mask"):
        ds.subset([0.5])
    with pytest.raises(IndexError, match=r"index 8 out of range for cub200 \(train\) with 8 items"):
        ds[8]


def test_subset_of_dict_and_dense_targets(tmp_path):
    make_voc(tmp_path / "voc")
    voc = real.voc2007(tmp_path / "voc", "trainval", image_size=8)
    sub = voc.subset([2])
    assert torch.equal(sub.targets["labels"], voc.targets["labels"][[2]])
    assert torch.equal(sub.get_target(0)["difficult"], voc.targets["difficult"][2])
    make_nyu(tmp_path / "nyu")
    nyu = real.nyuv2(tmp_path / "nyu", "train", image_size=16).subset([2, 0])
    assert nyu.files == ["train/image/10.png", "train/image/0.png"]
    assert nyu.mask_files == ["train/seg13/10.png", "train/seg13/0.png"]
    assert nyu.depth_files == ["train/depth/10.npy", "train/depth/0.npy"]


def test_dataloader_batches(tmp_path):
    make_voc(tmp_path / "voc")
    make_nyu(tmp_path / "nyu")
    voc = real.voc2007(tmp_path / "voc", "trainval", image_size=8)
    x, y = next(iter(torch.utils.data.DataLoader(voc, batch_size=3)))
    assert x.shape == (3, 3, 8, 8) and y["labels"].shape == (3, 20) and y["difficult"].dtype == torch.bool
    nyu = real.nyuv2(tmp_path / "nyu", "train", image_size=(8, 12))
    x, y = next(iter(torch.utils.data.DataLoader(nyu, batch_size=2)))
    assert x.shape == (2, 3, 8, 12) and y["mask"].shape == (2, 8, 12) and y["depth"].shape == (2, 8, 12)


def test_registry(cub):
    root, _ = cub
    assert real.available() == sorted(["cub200", "stanford_dogs", "voc2007", "coco2014_multilabel", "celeba",
                                       "nyuv2", "camvid"])
    ds = real.load("cub200", root, split="test", image_size=8)
    assert ds.name == "cub200" and ds.split == "test"
    with pytest.raises(KeyError, match=r"no real dataset named 'cub'; closest: \['cub200'"):
        real.load("cub", root)


def test_bad_image_size(cub):
    root, _ = cub
    with pytest.raises(ValueError, match=r"image_size must be an int or a \(height, width\) pair"):
        real.cub200(root, image_size=(8, 8, 8))
    with pytest.raises(ValueError, match="image_size must be positive"):
        real.cub200(root, image_size=0)
    with pytest.raises(TypeError, match=r"image_size must be an int or a \(height, width\) pair, got True"):
        real.cub200(root, image_size=True)


def test_bad_root(tmp_path):
    with pytest.raises(TypeError, match=r"CamVid: root=None; pass the folder where you put the dataset"):
        real.camvid(None)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match=r"COCO 2014 not found at .*file.txt: this is a file, not a folder"):
        real.coco2014_multilabel(tmp_path / "file.txt")


def test_get_image_get_target_and_with_transform(cub, tmp_path):
    root, _ = cub
    ds = real.cub200(root, "test", image_size=8)
    assert ds.info["task"] == "classification" and ds.info["source"] == "cub200"
    assert torch.equal(ds.get_image(1), ds[1][0]) and torch.equal(ds.get_target(1), ds[1][1])
    assert int(ds.get_target(torch.tensor(2))) == int(ds.targets[2])
    with pytest.raises(TypeError, match="dataset index must be an int, got float"):
        ds[1.5]
    big = ds.with_transform(real.default_transform(16))
    assert big.get_image(0).shape == (3, 16, 16) and big.fingerprint != ds.fingerprint
    assert ds.get_image(0).shape == (3, 8, 8)  # the original is untouched
    train = real.cub200(root, "train", image_size=8)
    assert repr(train.with_transform(None).transform) == repr(ds.transform)  # None: evaluation transform
    # dense: the image alone, without reading the maps (label-free distillation)
    make_nyu(tmp_path)
    nyu = real.nyuv2(tmp_path, "train", image_size=16)
    assert nyu.info["task"] == "dense"
    shutil.rmtree(tmp_path / "train" / "seg13")
    assert nyu.get_image(0).shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError):
        nyu[0]
    make_celeba(tmp_path / "celeba")
    assert real.celeba(tmp_path / "celeba").info["task"] == "attributes"


def test_works_with_the_embedded_data_helpers(tmp_path):
    """kaviz.data's union / split / Unlabeled take real datasets as they are."""
    data = pytest.importorskip("kaviz.data")
    if not hasattr(data, "union"):
        pytest.skip("kaviz.data.union is not available")
    make_cub(tmp_path / "cub")
    make_dogs(tmp_path / "dogs")
    cub = real.cub200(tmp_path / "cub", "train", image_size=8)
    dogs = real.stanford_dogs(tmp_path / "dogs", "train", image_size=8)
    u = data.union([cub, dogs])
    assert u.num_classes == 6 and u.sources == ["cub200", "stanford_dogs"]
    assert torch.equal(u.targets, torch.cat([cub.targets, dogs.targets + 3]))
    assert u[len(cub)][0].shape == (3, 8, 8)
    parts = data.split(cub, val=0.25, test=0.25, seed=0)
    assert all(type(p) is type(cub) for p in parts)
    assert sorted(sum((p.files for p in parts), [])) == sorted(cub.files)
    make_nyu(tmp_path / "nyu")
    x = data.Unlabeled(real.nyuv2(tmp_path / "nyu", "train", image_size=8))[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 8, 8)


# -------------------------------------------------------------------------------------------------
# The layouts users have, and awkward files


def test_celeba_distribution_layout(tmp_path):
    """CelebA's own tree: Img/img_align_celeba/, Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt."""
    info = make_celeba(tmp_path, distribution=True)
    ds = real.celeba(tmp_path, "train", image_size=8)
    assert ds.files == ["Img/img_align_celeba/" + n for n in info["names"][:3]]
    assert torch.equal(ds.targets, torch.from_numpy((info["values"][:3] == 1).astype(np.int64)))
    assert ds[0][0].shape == (3, 8, 8)
    # unzipped one level deeper (Img/img_align_celeba/img_align_celeba/...) is followed too
    inner = tmp_path / "Img" / "img_align_celeba"
    shutil.move(str(inner), str(tmp_path / "Img" / "tmp"))
    inner.mkdir()
    shutil.move(str(tmp_path / "Img" / "tmp"), str(inner / "img_align_celeba"))
    assert real.celeba(tmp_path, "test", image_size=8).files[0] == "Img/img_align_celeba/img_align_celeba/000005.jpg"
    shutil.rmtree(tmp_path / "Img")
    (tmp_path / "Img").mkdir()
    (tmp_path / "Img" / "img_align_celeba.zip").write_bytes(b"PK")
    with pytest.raises(DatasetLayoutError,
                       match=r"Img/ holds no img_align_celeba/ folder \(unzip img_align_celeba.zip"):
        real.celeba(tmp_path)


@pytest.mark.parametrize("layout", ["split_first", "kind_first", "mtan"])
def test_nyu_layouts(tmp_path, layout):
    info = make_nyu(tmp_path, layout=layout)
    ds = real.nyuv2(tmp_path, "train", image_size=32, augment=False)
    assert ds.info["layout"] == layout and len(ds) == 3
    first = {"split_first": "train/image/0.png", "kind_first": "image/train/0.png", "mtan": "train/image/0.npy"}
    assert ds.files[0] == first[layout]
    _, y = ds[0]
    _, img, mask, depth = info["train"][0]
    assert torch.equal(y["mask"], torch.from_numpy(np.where(mask < 0, 255, mask)))
    assert torch.equal(y["depth"], torch.from_numpy(depth))
    assert np.array_equal(ds.image_array(0), img)  # MTAN's float [0, 1] images read back exactly
    test = real.nyuv2(tmp_path, "test", augment=False)  # MTAN calls the test split val/
    assert len(test) == 2 and test.info["layout"] == layout


def test_nyu_40_classes_and_errors(tmp_path):
    info = make_nyu(tmp_path, seg40=True)
    ds = real.nyuv2(tmp_path, "train", image_size=32, augment=False, classes=40)
    assert ds.num_classes == 40 and ds.classes[30] == "person" and ds.mask_files[0] == "train/seg40/0.png"
    mask = info["train"][0][2]
    assert torch.equal(ds[0][1]["mask"], torch.from_numpy(np.where(mask < 0, 255, np.where(mask == 1, 30, 0))))
    assert real.nyuv2(tmp_path, "train", classes=13).num_classes == 13
    with pytest.raises(ValueError, match=r"classes=21; NYUv2 comes with 13 \(seg13\) or 40"):
        real.nyuv2(tmp_path, classes=21)
    mtan = tmp_path / "mtan"
    make_nyu(mtan, layout="mtan")
    with pytest.raises(DatasetLayoutError, match=r"MTAN's folders hold the 13-class labels only"):
        real.nyuv2(mtan, classes=40)
    with pytest.raises(DatasetLayoutError, match=r"no train split in any known layout"):
        real.nyuv2(tmp_path / "mtan" / "train")


@pytest.mark.parametrize("kind", ["rgb", "gray", "cmyk", "exif"])
def test_jpeg_variants_decode_upright_and_alike(tmp_path, kind):
    """Grayscale, CMYK and EXIF-rotated JPEGs: the tensor path (decode_jpeg, the default transforms)
    and the PIL path (a user's own transform) give the same upright RGB pixels."""
    from kaviz.data.real.base import _load_image, _load_rgb

    rng = np.random.default_rng(0)
    upright = np.zeros((24, 40, 3), np.uint8)
    upright[:12] = (200, 40, 30)          # red top half, blue bottom: a rotation shows at once
    upright[12:] = (30, 40, 200)
    upright[:, :5] = rng.integers(0, 256, (24, 5, 3))
    path = tmp_path / f"{kind}.jpg"
    expected = save_jpeg_variant(path, upright, kind)
    pil = np.asarray(_load_rgb(path))
    tensor = _load_image(path, as_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
    t = tensor.permute(1, 2, 0).numpy()
    assert pil.shape == t.shape == (24, 40, 3)
    assert np.abs(pil.astype(int) - t.astype(int)).max() <= 1
    # content: the right colours in the right place (JPEG is lossy: compare the block means)
    assert np.abs(pil[2:10, 8:].mean((0, 1)) - expected[2:10, 8:].mean((0, 1))).max() < 8
    assert np.abs(pil[14:22, 8:].mean((0, 1)) - expected[14:22, 8:].mean((0, 1))).max() < 8


def test_jpeg_decoder_choice_and_dataset_items(tmp_path, cub):
    root, _ = cub
    ds = real.cub200(root, "test", image_size=16, augment=False)
    assert isinstance(ds._pil(0), torch.Tensor)  # default transform: decoded to a tensor
    own = ds.with_transform(lambda im: torch.from_numpy(np.asarray(im)).permute(2, 0, 1))
    assert not isinstance(own._pil(0), torch.Tensor)  # a user's transform gets PIL images
    assert own.fingerprint != ds.fingerprint
    via_pil = ds.with_transform(real.default_transform(16))
    assert via_pil.transform.__class__ is ds.transform.__class__
    assert (ds[0][0] - via_pil[0][0]).abs().max() < 0.1  # tensor vs PIL resizing: the same picture
    assert ds.image_array(0).shape == (16, 16, 3) and ds.image_array(0).dtype == np.uint8


def test_crlf_index_files(tmp_path):
    cub_root = tmp_path / "cub"
    info = make_cub(cub_root)
    celeba_root = tmp_path / "celeba"
    cinfo = make_celeba(celeba_root, distribution=True)
    voc_root = tmp_path / "voc"
    make_voc(voc_root)
    assert to_crlf(tmp_path)
    assert b"\r\n" in (cub_root / "images.txt").read_bytes()
    assert real.cub200(cub_root, "train").targets.tolist() == [c for _, c in info["train"]]
    ds = real.celeba(celeba_root, "train")
    assert ds.files[0] == "Img/img_align_celeba/000001.jpg" and ds.targets.shape == (3, 40)
    assert torch.equal(ds.targets, torch.from_numpy((cinfo["values"][:3] == 1).astype(np.int64)))
    assert real.voc2007(voc_root, "test").files == ["JPEGImages/000004.jpg", "JPEGImages/000005.jpg"]


def test_notebook_fixture_trees_load(tmp_path):
    """tests/make_fixtures.py: every tree loads with its loader, in the layouts the notebooks' real-data
    test relies on, with the awkward files real datasets have."""
    from make_fixtures import build

    roots = build(tmp_path)
    sizes = {
        "cub200": (real.cub200(roots["cub200"], "train"), 16, 4),
        "stanford_dogs": (real.stanford_dogs(roots["stanford_dogs"], "test"), 8, 4),
        "voc2007": (real.voc2007(roots["voc2007"], "trainval"), 40, 20),
        "coco2014": (real.coco2014_multilabel(roots["coco2014"], "val"), 24, 80),  # 2 images without objects dropped
        "celeba": (real.celeba(roots["celeba"], "valid"), 18, 40),
        "nyuv2": (real.nyuv2(roots["nyuv2"], "test", classes=40), 4, 40),
        "nyuv2_mtan": (real.nyuv2(roots["nyuv2_mtan"], "test"), 4, 13),
        "camvid": (real.camvid(roots["camvid"], "val"), 3, 11),
    }
    for name, (ds, n, classes) in sizes.items():
        assert (len(ds), ds.num_classes) == (n, classes), name
    assert real.nyuv2(roots["nyuv2"], "train").info["layout"] == "kind_first"
    assert real.nyuv2(roots["nyuv2_mtan"], "train").info["layout"] == "mtan"
    assert real.celeba(roots["celeba"], "train").files[0].startswith("Img/img_align_celeba/")
    assert b"\r\n" in (roots["cub200"] / "images.txt").read_bytes()
    voc = real.voc2007(roots["voc2007"], "test")
    assert voc.targets["difficult"].any() and (voc.targets["labels"].sum(0) > 0).all()  # every class in test
    modes, exif = set(), 0
    for p in sorted((roots["cub200"] / "images").rglob("*.jpg")):
        with Image.open(p) as im:
            modes.add(im.mode)
            exif += im.getexif().get(0x0112, 1) != 1
    assert {"RGB", "L", "CMYK"} <= modes and exif > 0
    assert len(real.cub200(roots["cub200_15"], "train")) == 40


# -------------------------------------------------------------------------------------------------
# small real splits: at least one validation image per class, and max_per_split


def test_split_min_per_class_keeps_a_validation_image_of_every_class(cub):
    from kaviz.data import split

    root, _ = cub
    ds = real.cub200(root, "train", image_size=16, augment=False)  # 8 images: 2 or 3 per class
    assert len(split(ds, val=0.1, test=0.0, seed=0).val) == 0      # 10 % rounds to none: the bug's cause
    sp = split(ds, val=0.1, test=0.0, seed=0, min_per_class=1)
    assert torch.bincount(sp.val.targets, minlength=3).tolist() == [1, 1, 1]
    assert torch.bincount(sp.train.targets, minlength=3).min() >= 1
    assert not set(sp.train.files) & set(sp.val.files) and len(sp.train) + len(sp.val) == len(ds)
    # a class of one image keeps it in train; the floor never empties the training split
    one = ds.subset([0, 1, 2, 3, 4, 5, 6])
    sp1 = split(one, val=0.1, test=0.1, seed=0, min_per_class=1)
    counts = torch.bincount(one.targets, minlength=3)
    assert (torch.bincount(sp1.train.targets, minlength=3) >= (counts > 0).long()).all()
    with pytest.raises(ValueError, match="min_per_class"):
        split(ds, val=0.1, min_per_class=-1)


def test_limit_is_class_balanced_seeded_and_deterministic(cub, tmp_path):
    from kaviz.data import limit

    root, _ = cub
    ds = real.cub200(root, "train", image_size=16)
    assert limit(ds, None) is ds and limit(ds, 100) is ds
    a, b = limit(ds, 4, seed=3), limit(ds, 4, seed=3)
    assert a.files == b.files and len(a) == 4
    assert sorted(torch.bincount(a.targets, minlength=3).tolist()) == [1, 1, 2]  # round robin over classes
    assert limit(ds, 3, seed=0).files != limit(ds, 3, seed=1).files or len(ds) <= 3
    assert torch.bincount(limit(ds, 3, seed=1).targets, minlength=3).tolist() == [1, 1, 1]
    make_camvid(tmp_path / "camvid")
    dense = real.camvid(tmp_path / "camvid", "train", image_size=(16, 16))
    d2 = limit(dense, 2, seed=0)
    assert len(d2) == 2 and d2.files == limit(dense, 2, seed=0).files
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_per_split"):
            limit(ds, bad)


def test_consistency_load_data_small_cub_and_max_per_split(cub):
    from kaviz.methods import consistency as kc

    root, _ = cub
    with pytest.warns(UserWarning, match="kept one of each such class"):
        d = kc.load_data("cub200", root=root, image_size=16)
    assert torch.bincount(d.val.targets, minlength=3).tolist() == [1, 1, 1]
    narrow = kc.coarse_task(d.val, kc.default_coarse_groups(d.train.classes))  # failed on an empty val split
    assert len(narrow) == 3
    with pytest.warns(UserWarning):
        small = kc.load_data("cub200", root=root, image_size=16, max_per_split=2)
    assert (len(small.train), len(small.val), len(small.test)) == (2, 2, 2)
    assert small.train_features.files == small.train.files
    with pytest.raises(ValueError, match="empty dataset.*no image"):
        kc.Relabelled(d.val.subset([]), [0, 0, 0], ["all"])


def test_methods_load_data_max_per_split(tmp_path):
    from make_fixtures import build

    from kaviz.methods import cfl, lshfm, recombination, sbm

    roots = build(tmp_path, ["cub200", "stanford_dogs", "voc2007", "nyuv2", "camvid"])
    pair = cfl.load_data("cub_dogs", cub_root=roots["cub200"], dogs_root=roots["stanford_dogs"], image_size=16,
                         max_per_split=3)
    assert all(len(part) <= 3 for sp in pair.sources.values() for part in sp) and len(pair.train) == 6
    full = cfl.load_data("cub_dogs", cub_root=roots["cub200"], dogs_root=roots["stanford_dogs"], image_size=16)
    assert len(full.train) > 6
    tr, va, te = lshfm.load_data("voc2007", root=roots["voc2007"], image_size=16, max_per_split=5)
    assert (len(tr), len(va), len(te)) == (5, 5, 5)
    (tr, va, te), _ = sbm.scene_splits("nyuv2", root=roots["nyuv2"], image_size=(16, 16), max_per_split=2)
    assert max(len(tr), len(va), len(te)) <= 2
    d = recombination.load_splits("camvid", root=roots["camvid"], size=16, max_per_split=2)
    assert all(len(d[s]) <= 2 for s in ("train", "val", "test"))
