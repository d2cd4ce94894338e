"""yolofuse.prepare: each published layout, built here file by file, converts to labels a user can check by hand and
trains for one epoch; bad input gives one line and changes nothing; re-runs rebuild the same tree.

Trees follow the published layouts (folder and file names, XML / JSON / bbGt syntax, CRLF endings) with tiny
80 x 64 images; 3-channel IR files as LLVIP, M3FD and KAIST ship them. Box coordinates are chosen so that the
expected YOLO lines can be written down.
"""

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import ROOT, run_train_dual

from yolofuse import YOLO
from yolofuse import prepare as prep

W, H = 80, 64  # every test image; LLVIP's 1280 x 1024 scaled by 1/16


# ------------------------------------------------------------------------------------------------------------- helpers
def image(path: Path, value: int = 90) -> Path:
    """A 3-channel W x H image (IR too: the published IR files are 3-channel) with a bright patch, so it is not flat."""
    img = np.full((H, W, 3), value, np.uint8)
    img[8:40, 10:30] = 255 - value
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), path
    return path


def write(path: Path, text: str, crlf: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", "\r\n" if crlf else "\n").encode())
    return path


def voc_xml(filename: str, objects: list[tuple], folder: str = "LLVIP") -> str:
    """Pascal VOC annotation as LLVIP, M3FD and labelImg write it: one <object> per box, tab-indented."""
    objs = "".join(
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
        f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for name, x0, y0, x1, y1 in objects
    )
    return (
        f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{filename}</filename>\n"
        f"\t<source>\n\t\t<database>Unknown</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{W}</width>\n\t\t<height>{H}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
        f"\t<segmented>0</segmented>\n{objs}</annotation>\n"
    )


def yolo(cls: int, x0: float, y0: float, x1: float, y1: float) -> str:
    """The label line prepare must write for a pixel box already inside the W x H image."""
    return f"{cls} {(x0 + x1) / 2 / W:.6f} {(y0 + y1) / 2 / H:.6f} {(x1 - x0) / W:.6f} {(y1 - y0) / H:.6f}\n"


def run(*args) -> tuple[int, str, str]:
    """`python -m yolofuse.prepare ARGS` in this process (fast); returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = prep.main([*map(str, args), "--no-progress"])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under `root`: content hash and mtime (hard links change a file's link count, never these)."""
    return {
        p.relative_to(root).as_posix(): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tree(root: Path) -> dict[str, str]:
    """What prepare wrote: every file's relative path, with the text of labels and data.yaml."""
    return {
        p.relative_to(root).as_posix(): p.read_text() if p.suffix in (".txt", ".yaml") else "image"
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def labels(dst: Path, split: str) -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted((dst / "labels" / split).glob("*.txt"))}


def data_of(dst: Path) -> dict:
    return yaml.safe_load((dst / "data.yaml").read_text())


def train_one_epoch(data_yaml: Path, project: Path) -> dict:
    """One epoch through the YOLO API on the converted set; returns what the train loader read."""
    model = YOLO(str(ROOT / "yolov8n-fuse.yaml"))
    model.train(
        data=str(data_yaml), epochs=1, imgsz=64, batch=4, nbs=4, workers=0, device="cpu", project=str(project),
        name="run", exist_ok=True, plots=False, verbose=False, close_mosaic=0,
    )  # fmt: skip
    assert (project / "run" / "weights" / "last.pt").is_file()
    dataset = model.trainer.train_loader.dataset
    return {"pairs": len(dataset.im_files), "boxes": sum(len(lb["cls"]) for lb in dataset.labels)}


# --------------------------------------------------------------------------------------------------- published layouts
def llvip_tree(src: Path) -> Path:
    """LLVIP as unpacked from LLVIP.zip: visible/ and infrared/ with train/ and test/, Annotations/*.xml (CRLF)."""
    for split, stems in (("train", ["010001", "010002", "010003", "010004", "010005"]), ("test", ["190001", "190002"])):
        for stem in stems:
            image(src / "visible" / split / f"{stem}.jpg")
            image(src / "infrared" / split / f"{stem}.jpg", value=160)
    image(src / "visible" / "train" / "010006.jpg")  # no infrared partner
    write(src / "visible" / "train" / "010008.jpg", "not a JPEG")  # an unreadable frame
    image(src / "infrared" / "train" / "010008.jpg")
    image(src / "infrared" / "train" / "010007.jpg")  # no visible partner
    ann = src / "Annotations"
    write(ann / "010001.xml", voc_xml("010001.jpg", [("person", 10, 8, 30, 40)]), crlf=True)
    write(ann / "010002.xml", voc_xml("010002.jpg", [("person", 60, 20, 85, 70), ("person", 0, 0, 20, 32)]), crlf=True)
    write(ann / "010003.xml", voc_xml("010003.jpg", []), crlf=True)  # nobody in the frame
    write(ann / "010004.xml", "")  # an empty annotation file
    # 010005: no annotation at all
    write(ann / "010006.xml", voc_xml("010006.jpg", [("person", 1, 2, 3, 4)]), crlf=True)
    write(ann / "010007.xml", voc_xml("010007.jpg", [("person", 1, 2, 3, 4)]), crlf=True)
    write(ann / "010008.xml", voc_xml("010008.jpg", [("person", 1, 2, 3, 4)]), crlf=True)
    write(ann / "190001.xml", voc_xml("190001.jpg", [("person", 40, 10, 60, 50)]), crlf=True)
    write(ann / "190002.xml", voc_xml("190002.jpg", [("person", 82, 10, 90, 50)]), crlf=True)  # wholly outside
    return src


def kaist_tree(src: Path) -> Path:
    """KAIST as the official fetch script unpacks it: images/setXX/VYYY/{visible,lwir}/I00000.jpg and
    annotations/setXX/VYYY/I00000.txt in bbGt version 3 ('label x y w h occ vx vy vw vh ign ang')."""
    for set_, video, frames in (("set00", "V000", 3), ("set01", "V000", 1), ("set06", "V000", 2)):
        for k in range(frames):
            image(src / "images" / set_ / video / "visible" / f"I{k:05d}.jpg")
            image(src / "images" / set_ / video / "lwir" / f"I{k:05d}.jpg", value=170)
    image(src / "images" / "set06" / "V001" / "visible" / "I00000.jpg")  # its lwir frame is missing
    image(src / "images" / "set01" / "V000" / "visible" / "I00001.jpg")
    write(src / "images" / "set01" / "V000" / "lwir" / "I00001.jpg", "")  # an empty, unreadable lwir frame
    a = src / "annotations"
    header = "% bbGt version=3\n"
    write(a / "set00/V000/I00000.txt", header + "person 10 8 20 32 0 0 0 0 0 0 0\n", crlf=True)
    write(a / "set00/V000/I00001.txt", header + "person 70 30 20 40 1 70 30 10 20 0 0\ncyclist 1 1 9 9 0 0 0 0 0 0 0\n")
    write(a / "set00/V000/I00002.txt", header)  # a frame without people: only the header
    write(a / "set01/V000/I00000.txt", "")  # an empty file
    write(a / "set01/V000/I00001.txt", header + "person 10 8 20 32 0 0 0 0 0 0 0\n")
    write(a / "set06/V000/I00000.txt", header + "people 5 5 30 30 0 0 0 0 0 0 0\nperson 40 10 20 40 0 0 0 0 0 0 0\n")
    write(a / "set06/V000/I00001.txt", header + "person? 40 10 20 40 0 0 0 0 0 0 0\n", crlf=True)
    write(a / "set06/V001/I00000.txt", header + "person 40 10 20 40 0 0 0 0 0 0 0\n")
    return src


M3FD_FILES = {  # stem: objects (M3FD's class names, as in TarDAL's loader)
    "00000": [("People", 10, 8, 30, 40), ("Car", 40, 30, 79, 63)],
    "00001": [("Lamp", 60, 0, 70, 20), ("Truck", -5, 10, 30, 50)],
    "00002": [],
    "00003": [("Bus", 5, 5, 50, 40)],
    "00004": [("Motorcycle", 20, 20, 40, 60)],
    "00005": [("People", 1, 1, 11, 21)],
}


def m3fd_tree(group: Path) -> Path:
    """M3FD side by side: Vis/*.png, Ir/*.png (a 3-channel grayscale bitmap, as M3FD's), Annotation/*.xml."""
    for stem, objects in M3FD_FILES.items():
        image(group / "Vis" / f"{stem}.png")
        image(group / "Ir" / f"{stem}.png", value=150)
        write(group / "Annotation" / f"{stem}.xml", voc_xml(f"{stem}.png", objects, folder="M3FD"), crlf=True)
    return group


def voc_export(src: Path) -> Path:
    """A labelImg export: rgb/, ir/ (PNG) and one folder of Pascal VOC .xml files named by image stem."""
    objects = {
        "a": [("person", 10, 8, 30, 40), ("car", 40, 30, 79, 63)],
        "b": [("car", 50, 10, 100, 30)],
        "c": [("person", 12, 10, 22, 30)],
        "d": [],
        "e": [("person", 30, 20, 50, 60)],
    }
    for stem, objs in objects.items():
        image(src / "rgb" / f"{stem}.jpg")
        image(src / "ir" / f"{stem}.png", value=140)
        write(src / "Annotations" / f"{stem}.xml", voc_xml(f"{stem}.jpg", objs, folder="rgb"), crlf=stem == "a")
    image(src / "rgb" / "f.jpg")  # not annotated yet
    image(src / "ir" / "f.png")
    return src


def coco_export(src: Path) -> Path:
    """A CVAT 'COCO 1.0' export: images/, ir/, annotations/instances_default.json; category ids from 1."""
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    for name in [*names, "unlisted.jpg"]:
        image(src / "images" / name)
        image(src / "ir" / name, value=140)
    anns = [  # (image id, category id, bbox [x, y, w, h], iscrowd)
        (1, 1, [10, 8, 20, 32], 0),
        (1, 2, [40.5, 30, 45, 20], 0),  # past the right border
        (2, 2, [50, 10, 20, 20], 0),
        (2, 1, [0, 0, 80, 64], 1),  # a crowd region
        (3, 1, [12, 10, 10, 20], 0),
        (5, 1, [30, 20, 20, 40], 0),
    ]  # image 4 (d.jpg) is listed without annotations: a negative
    coco = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "url": "", "version": "", "year": ""},
        "categories": [{"id": 1, "name": "person", "supercategory": ""}, {"id": 2, "name": "car", "supercategory": ""}],
        "images": [
            {
                "id": i,
                "width": W,
                "height": H,
                "file_name": n,
                "license": 0,
                "flickr_url": "",
                "coco_url": "",
                "date_captured": 0,
            }
            for i, n in enumerate(names, 1)
        ],  # fmt: skip
        "annotations": [
            {
                "id": k,
                "image_id": i,
                "category_id": c,
                "segmentation": [],
                "area": b[2] * b[3],
                "bbox": b,
                "iscrowd": crowd,
                "attributes": {"occluded": False},
            }
            for k, (i, c, b, crowd) in enumerate(anns, 1)
        ],  # fmt: skip
    }
    write(src / "annotations" / "instances_default.json", json.dumps(coco))
    return src


def yolo_export(src: Path) -> Path:
    """YOLO txt labels in their own folder, labelImg's classes.txt beside them; one empty label, one missing."""
    lines = {
        "a": yolo(0, 10, 8, 30, 40) + yolo(1, 40, 30, 79, 63),
        "b": "1 0.9 0.3 0.4 0.2\n",  # right half outside the image
        "c": yolo(0, 12, 10, 22, 30),
        "d": "",
        "e": yolo(0, 30, 20, 50, 60),
    }
    for stem, text in lines.items():
        image(src / "rgb" / f"{stem}.jpg")
        image(src / "ir" / f"{stem}.jpg", value=140)
        write(src / "labels" / f"{stem}.txt", text, crlf=stem == "a")
    image(src / "rgb" / "f.jpg")
    image(src / "ir" / "f.jpg")  # f has no label file
    write(src / "labels" / "classes.txt", "person\ncar\n")
    return src


# --------------------------------------------------------------------------------------------------------------- LLVIP
def test_llvip_converts_to_the_labels_by_hand_and_trains(tmp_path):
    src, dst = llvip_tree(tmp_path / "LLVIP"), tmp_path / "llvip-yolo"
    before = snapshot(src)
    code, out, err = run("llvip", src, dst)
    assert code == 0, err

    assert labels(dst, "train") == {
        "010001": yolo(0, 10, 8, 30, 40),
        "010002": yolo(0, 60, 20, 80, 64) + yolo(0, 0, 0, 20, 32),  # cut at the border
        "010003": "",
        "010004": "",
    }
    assert labels(dst, "val") == {"190001": yolo(0, 40, 10, 60, 50), "190002": ""}  # LLVIP's test split is val
    for split, stems in (("train", ["010001", "010002", "010003", "010004"]), ("val", ["190001", "190002"])):
        assert sorted(p.name for p in (dst / "images" / split).iterdir()) == [f"{s}.jpg" for s in stems]
        assert sorted(p.name for p in (dst / "imagesIR" / split).iterdir()) == [f"{s}.jpg" for s in stems]
    rgb, ir = dst / "images/train/010001.jpg", dst / "imagesIR/train/010001.jpg"
    assert rgb.stat().st_ino == (src / "visible/train/010001.jpg").stat().st_ino  # hard links, not copies
    assert ir.stat().st_ino == (src / "infrared/train/010001.jpg").stat().st_ino
    assert data_of(dst) == {
        "path": str(dst), "train": "images/train", "val": "images/val", "channels": 4, "names": {0: "person"},
    }  # fmt: skip
    assert snapshot(src) == before

    # The summary: pairs and boxes per split, and each skipped frame named with its reason.
    assert " 4 " in out.splitlines()[2] and out.splitlines()[2].split() == ["train", "4", "3"]
    assert out.splitlines()[3].split() == ["val", "2", "1"]
    assert "skipped 4 pairs" in out and "hard links" in out
    assert f"no IR partner: {src / 'visible/train/010006.jpg'}" in out
    assert f"no RGB partner: {src / 'infrared/train/010007.jpg'}" in out
    assert f"annotation missing: {src / 'visible/train/010005.jpg'}" in out
    assert f"unreadable image: {src / 'visible/train/010008.jpg'}" in out
    assert "2 cut at the image border" in out and "1 under 1 pixel" in out

    # python train_dual.py DATA=DST/data.yaml trains with no other step.
    result = run_train_dual(f"DATA={dst / 'data.yaml'}", f"RUNS_DIR={tmp_path / 'runs'}", "EPOCHS=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Done. best.pt" in result.stdout


def test_cli_shows_progress_and_the_table(tmp_path):
    """The real command line, as a user types it from the repository folder."""
    src, dst = llvip_tree(tmp_path / "LLVIP"), tmp_path / "out"
    cmd = [sys.executable, "-m", "yolofuse.prepare", "llvip", str(src), str(dst)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Reading" in result.stderr and "Writing" in result.stderr and "100%" in result.stderr  # progress bars
    assert result.stdout.splitlines()[1].split() == ["split", "pairs", "person"], result.stdout  # nothing before
    header = (dst / "data.yaml").read_text().splitlines()[0]
    assert shlex.split(header.removeprefix("# Written by: "))[3:] == ["llvip", str(src), str(dst)]


# --------------------------------------------------------------------------------------------------------------- KAIST
def test_kaist_bbgt_sets_and_classes(tmp_path):
    src, dst = kaist_tree(tmp_path / "kaist-rgbt"), tmp_path / "kaist-yolo"
    before = snapshot(src)
    code, out, err = run("kaist", src, dst)
    assert code == 0, err
    assert labels(dst, "train") == {  # sets 00-05 train; bbGt boxes are x y w h
        "set00_V000_I00000": yolo(0, 10, 8, 30, 40),
        "set00_V000_I00001": yolo(0, 70, 30, 80, 64),  # cut at the border; the cyclist is another class
        "set00_V000_I00002": "",
        "set01_V000_I00000": "",
    }
    assert labels(dst, "val") == {  # sets 06-11 val
        "set06_V000_I00000": yolo(0, 40, 10, 60, 50),
        "set06_V000_I00001": "",
    }
    assert (dst / "imagesIR/val/set06_V000_I00000.jpg").is_file()
    assert data_of(dst)["names"] == {0: "person"} and data_of(dst)["channels"] == 4
    assert f"no IR partner: {src / 'images/set06/V001/visible/I00000.jpg'}" in out
    assert f"unreadable image: {src / 'images/set01/V000/lwir/I00001.jpg'}" in out
    assert "3 of other classes (" in out and "people 1" in out and "cyclist 1" in out and "person? 1" in out
    assert snapshot(src) == before
    assert train_one_epoch(dst / "data.yaml", tmp_path / "runs") == {"pairs": 4, "boxes": 2}


def test_kaist_classes_option_keeps_the_ignore_labels_too(tmp_path):
    src, dst = kaist_tree(tmp_path / "kaist-rgbt"), tmp_path / "out"
    code, out, err = run("kaist", src, dst, "--classes", "person,cyclist")
    assert code == 0, err
    assert data_of(dst)["names"] == {0: "person", 1: "cyclist"}
    assert labels(dst, "train")["set00_V000_I00001"] == yolo(0, 70, 30, 80, 64) + yolo(1, 1, 1, 10, 10)


# ---------------------------------------------------------------------------------------------------------------- M3FD
def test_m3fd_fixed_classes_and_a_stable_hash_split(tmp_path):
    src, dst = m3fd_tree(tmp_path / "M3FD_Detection"), tmp_path / "m3fd-yolo"
    before = snapshot(src)
    code, out, err = run("m3fd", src, dst, "--val-fraction", "0.3")
    assert code == 0, err
    names = {0: "People", 1: "Car", 2: "Bus", 3: "Lamp", 4: "Motorcycle", 5: "Truck"}
    assert data_of(dst)["names"] == names
    written = {**labels(dst, "train"), **labels(dst, "val")}
    assert written == {
        "00000": yolo(0, 10, 8, 30, 40) + yolo(1, 40, 30, 79, 63),
        "00001": yolo(3, 60, 0, 70, 20) + yolo(5, 0, 10, 30, 50),
        "00002": "",
        "00003": yolo(2, 5, 5, 50, 40),
        "00004": yolo(4, 20, 20, 40, 60),
        "00005": yolo(0, 1, 1, 11, 21),
    }
    val = set(labels(dst, "val"))
    assert val and val != set(M3FD_FILES), "both splits must hold pairs"
    assert (dst / "imagesIR/train").is_dir() and all(p.suffix == ".png" for p in (dst / "imagesIR").rglob("*.*"))
    assert snapshot(src) == before

    # A pair's split follows its name, not the order: removing other pairs never moves it.
    small = tmp_path / "small"
    m3fd_tree(small)
    for stem in ("00002", "00003"):
        for folder, suffix in (("Vis", "png"), ("Ir", "png"), ("Annotation", "xml")):
            (small / folder / f"{stem}.{suffix}").unlink()
    assert run("m3fd", small, tmp_path / "small-yolo", "--val-fraction", "0.3")[0] == 0
    assert set(labels(tmp_path / "small-yolo", "val")) == val - {"00002", "00003"}
    assert train_one_epoch(dst / "data.yaml", tmp_path / "runs")["boxes"] == sum(
        len(t.splitlines()) for t in labels(dst, "train").values()
    )


def test_m3fd_scene_folders_of_its_readme_tree(tmp_path):
    """The tree in TarDAL's README: Challenge/Beach/{Annotation,Ir,Vis}, Night/Basement/... Names may repeat."""
    src = tmp_path / "M3FD"
    m3fd_tree(src / "Challenge" / "Beach")
    m3fd_tree(src / "Night" / "Basement")
    code, out, err = run("m3fd", src, tmp_path / "out")
    assert code == 0, err
    names = {p.stem for p in (tmp_path / "out" / "images").rglob("*.png")}
    assert names == {f"{scene}_{stem}" for scene in ("Challenge_Beach", "Night_Basement") for stem in M3FD_FILES}


# ---------------------------------------------------------------------------------------------------- your own exports
def test_voc_export_sorted_classes_and_class_filter(tmp_path):
    src, dst = voc_export(tmp_path / "export"), tmp_path / "voc-yolo"
    before = snapshot(src)
    code, out, err = run("voc", src, dst, "--rgb", "rgb", "--ir", "ir", "--ann", "Annotations")
    assert code == 0, err
    assert data_of(dst)["names"] == {0: "car", 1: "person"}  # sorted
    written = {**labels(dst, "train"), **labels(dst, "val")}
    assert written == {
        "a": yolo(1, 10, 8, 30, 40) + yolo(0, 40, 30, 79, 63),
        "b": yolo(0, 50, 10, 80, 30),
        "c": yolo(1, 12, 10, 22, 30),
        "d": "",
        "e": yolo(1, 30, 20, 50, 60),
    }
    assert f"annotation missing: {src / 'rgb/f.jpg'}" in out
    assert sorted(p.suffix for p in (dst / "imagesIR").rglob("*.*")) == [".png"] * 5  # IR keeps its own format
    assert snapshot(src) == before
    trained = train_one_epoch(dst / "data.yaml", tmp_path / "runs")
    assert trained == {"pairs": len(labels(dst, "train")), "boxes": sum(map(len, map(str.splitlines, [
        t for t in labels(dst, "train").values()])))}  # fmt: skip

    # --classes keeps only those classes, in that order; the rest are counted.
    code, out, err = run("voc", src, tmp_path / "person", "--rgb", "rgb", "--ir", "ir", "--ann", "Annotations",
                         "--classes", "person")  # fmt: skip
    assert code == 0, err
    assert data_of(tmp_path / "person")["names"] == {0: "person"}
    kept = {**labels(tmp_path / "person", "train"), **labels(tmp_path / "person", "val")}
    assert kept["a"] == yolo(0, 10, 8, 30, 40) and kept["b"] == ""
    assert "2 of other classes (car 2)" in out


def test_coco_export(tmp_path):
    src, dst = coco_export(tmp_path / "cvat"), tmp_path / "coco-yolo"
    before = snapshot(src)
    code, out, err = run(
        "coco", src, dst, "--rgb", "images", "--ir", "ir", "--json", "annotations/instances_default.json"
    )
    assert code == 0, err
    assert data_of(dst)["names"] == {0: "car", 1: "person"}
    written = {**labels(dst, "train"), **labels(dst, "val")}
    assert written == {  # bbox is [x, y, w, h] in pixels
        "a": yolo(1, 10, 8, 30, 40) + yolo(0, 40.5, 30, 80, 50),
        "b": yolo(0, 50, 10, 70, 30),
        "c": yolo(1, 12, 10, 22, 30),
        "d": "",  # listed in the JSON without boxes: a negative
        "e": yolo(1, 30, 20, 50, 60),
    }
    assert f"annotation missing: {src / 'images/unlisted.jpg'}" in out
    assert "1 crowd regions (iscrowd: 1)" in out
    assert snapshot(src) == before
    assert train_one_epoch(dst / "data.yaml", tmp_path / "runs")["pairs"] == len(labels(dst, "train"))


def test_yolo_export(tmp_path):
    src, dst = yolo_export(tmp_path / "export"), tmp_path / "yolo-out"
    before = snapshot(src)
    code, out, err = run("yolo", src, dst, "--rgb", "rgb", "--ir", "ir", "--labels", "labels", "--val-fraction", "0.4")
    assert code == 0, err
    assert data_of(dst)["names"] == {0: "person", 1: "car"}  # classes.txt's order: the ids already mean it
    written = {**labels(dst, "train"), **labels(dst, "val")}
    assert written == {
        "a": yolo(0, 10, 8, 30, 40) + yolo(1, 40, 30, 79, 63),
        "b": yolo(1, 56, 12.8, 80, 25.6),  # cut at the border
        "c": yolo(0, 12, 10, 22, 30),
        "d": "",
        "e": yolo(0, 30, 20, 50, 60),
    }
    assert f"annotation missing: {src / 'rgb/f.jpg'}" in out
    assert snapshot(src) == before
    assert train_one_epoch(dst / "data.yaml", tmp_path / "runs")["pairs"] == len(labels(dst, "train"))


# --------------------------------------------------------------------------------------------------- re-runs and kills
def test_rerun_is_idempotent_and_follows_src(tmp_path):
    src, dst = llvip_tree(tmp_path / "LLVIP"), tmp_path / "out"
    assert run("llvip", src, dst)[0] == 0
    first = tree(dst)
    label_inode = (dst / "labels/train/010001.txt").stat().st_ino
    (dst / "labels" / "train.cache").write_text("left by a training run")
    assert run("llvip", src, dst)[0] == 0
    assert tree(dst) == first  # same files, same labels; the old cache went with the old labels
    assert (dst / "labels/train/010001.txt").stat().st_ino == label_inode  # unchanged: kept, not rewritten
    assert (dst / "images/train/010001.jpg").stat().st_ino == (src / "visible/train/010001.jpg").stat().st_ino
    assert sorted(p.name for p in dst.iterdir()) == [".yolofuse-prepare", "data.yaml", "images", "imagesIR", "labels"]

    write(src / "Annotations" / "010003.xml", voc_xml("010003.jpg", [("person", 1, 2, 11, 22)]))
    (src / "visible/train/010004.jpg").unlink()
    assert run("llvip", src, dst)[0] == 0
    assert labels(dst, "train")["010003"] == yolo(0, 1, 2, 11, 22)
    assert not (dst / "images/train/010004.jpg").exists() and "010004" not in labels(dst, "train")


def test_what_a_killed_run_left_in_staging_is_cleared(tmp_path):
    src, dst = llvip_tree(tmp_path / "LLVIP"), tmp_path / "out"
    assert run("llvip", src, dst)[0] == 0
    first = tree(dst)
    write(dst / prep.STAGING / "images" / "train" / "010001.jpg", "half a file")  # SIGKILL runs no cleanup
    assert run("llvip", src, dst)[0] == 0
    assert tree(dst) == first and not (dst / prep.STAGING).exists()


def test_interrupted_first_run_leaves_no_data_yaml(tmp_path, monkeypatch):
    src, dst = llvip_tree(tmp_path / "LLVIP"), tmp_path / "out"
    placed = []

    def place_then_die(self, a, b):
        if len(placed) == 5:
            raise KeyboardInterrupt
        placed.append(b)
        os.link(a, b)

    monkeypatch.setattr(prep.Placer, "__call__", place_then_die)
    with pytest.raises(KeyboardInterrupt):
        run("llvip", src, dst)
    assert not (dst / "data.yaml").exists()  # nothing there looks like a finished dataset
    assert not (dst / "images").exists() and not (dst / prep.STAGING).exists()


def test_interrupted_rerun_keeps_the_previous_dataset(tmp_path, monkeypatch):
    src, dst = llvip_tree(tmp_path / "LLVIP"), tmp_path / "out"
    assert run("llvip", src, dst)[0] == 0
    before = tree(dst)
    write(src / "Annotations" / "010003.xml", voc_xml("010003.jpg", [("person", 1, 2, 11, 22)]))

    def die(self, a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep.Placer, "__call__", die)
    with pytest.raises(KeyboardInterrupt):
        run("llvip", src, dst)
    assert tree(dst) == before  # still the whole previous dataset, data.yaml included

    monkeypatch.undo()
    real_replace = os.replace

    def die_before_data_yaml(a, b):  # the folders are swapped in, data.yaml is not written yet
        if Path(b).name == "data.yaml":
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(prep.os, "replace", die_before_data_yaml)
    with pytest.raises(KeyboardInterrupt):
        run("llvip", src, dst)
    assert not (dst / "data.yaml").exists()  # new labels may be there, but the folder does not look finished
    monkeypatch.undo()
    assert run("llvip", src, dst)[0] == 0 and labels(dst, "train")["010003"] == yolo(0, 1, 2, 11, 22)


# ----------------------------------------------------------------------------------------------------------- bad input
def one_line_error(code: int, out: str, err: str, *must_contain) -> str:
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    for part in must_contain:
        assert str(part) in err, f"{part!r} not in {err!r}"
    return err


def test_unknown_format_and_missing_src(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    one_line_error(*run("flir", src, dst), "unknown format 'flir'", "llvip, m3fd, kaist")
    one_line_error(*run("llvip", tmp_path / "nowhere", dst), tmp_path / "nowhere", "not found")
    one_line_error(*run("llvip", src, dst), src / "Annotations", "point SRC at")
    llvip_tree(src / "LLVIP")  # the zip's own top folder
    one_line_error(*run("llvip", src, dst), f"point SRC at {src / 'LLVIP'}")
    one_line_error(*run("voc", src, dst, "--rgb", "rgb"), "voc needs --rgb DIR --ir DIR --ann")
    one_line_error(*run("llvip", src, dst, "--val-fraction", "0.1"), "--val-fraction does not apply")
    assert not dst.exists()


def test_xml_that_does_not_parse_names_the_file_and_changes_nothing(tmp_path):
    src, dst = llvip_tree(tmp_path / "LLVIP"), tmp_path / "out"
    bad = write(src / "Annotations" / "190001.xml", "<annotation><object><name>person</name></annotation>")
    before = snapshot(src)
    one_line_error(*run("llvip", src, dst), bad, "not valid XML", "--skip-broken")
    assert not dst.exists() and snapshot(src) == before

    write(bad, voc_xml("190001.jpg", [("person", 40, 10, 60, 50)]))
    assert run("llvip", src, dst)[0] == 0
    done = tree(dst)
    write(bad, "<annotation><object><name>person</name></annotation>")
    one_line_error(*run("llvip", src, dst), bad)
    assert tree(dst) == done  # a failed re-run leaves the previous dataset whole

    code, out, err = run("llvip", src, dst, "--skip-broken")
    assert code == 0, err
    assert f"annotation broken: {bad}" in out and "190001" not in labels(dst, "val")


def test_class_filter_that_matches_nothing(tmp_path):
    src, dst = voc_export(tmp_path / "export"), tmp_path / "out"
    args = ("voc", src, dst, "--rgb", "rgb", "--ir", "ir", "--ann", "Annotations", "--classes", "dog,cat")
    one_line_error(*run(*args), src, "no box has class dog, cat", "car, person", "fix --classes")
    assert not dst.exists()


def test_two_frames_with_one_output_name(tmp_path):
    src = voc_export(tmp_path / "export")
    for stem in ("x/y", "x_y"):  # both would become x_y
        image(src / "rgb" / f"{stem}.jpg")
        image(src / "ir" / f"{stem}.png")
        write(src / "Annotations" / f"{stem}.xml", voc_xml("y.jpg", []))
    args = ("voc", src, tmp_path / "out", "--rgb", "rgb", "--ir", "ir", "--ann", "Annotations")
    one_line_error(*run(*args), src / "rgb/x_y.jpg", src / "rgb/x/y.jpg", "rename one of them")


def test_dst_that_prepare_did_not_write_or_inside_src_is_refused(tmp_path):
    src = llvip_tree(tmp_path / "LLVIP")
    foreign = tmp_path / "mine"
    write(foreign / "labels" / "train" / "x.txt", "0 0.5 0.5 0.1 0.1\n")
    one_line_error(*run("llvip", src, foreign), foreign / "labels", "did not write")
    assert (foreign / "labels" / "train" / "x.txt").read_text() == "0 0.5 0.5 0.1 0.1\n"
    before = snapshot(src)
    one_line_error(*run("llvip", src, src / "yolo"), "overlaps")
    one_line_error(*run("yolo", tmp_path, src, "--rgb", "LLVIP/visible", "--ir", "LLVIP/infrared", "--labels", "x"))
    assert snapshot(src) == before
