"""Prediction sources as RGB+IR pairs: image files, folders, globs, lists and videos, each with its IR partner.

The IR partner is found by the dataset's pairing rule (`images/` -> `imagesIR/`, same name), or given as `ir=`: a
file for an RGB file, a folder for an RGB folder (partners by name there). Images are read with `data.load_pair` at
full size (the predictor reads the model's input again at its size, as training does). A video is read frame by
frame beside its IR video.
"""

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from ultralytics.data.loaders import LoadImagesAndVideos, SourceTypes
from ultralytics.data.utils import IMG_FORMATS, VID_FORMATS
from ultralytics.utils import LOGGER

from yolofuse.data import IR_DIR, DatasetError, check_ir_header, ir_path, load_pair, partner_in, stack_pair

MAX_FRAME_GAP = 1  # RGB and IR videos whose frame counts differ by more are not one recording


def stack_frames(rgb: np.ndarray, ir: np.ndarray, channels: int) -> np.ndarray:
    """An RGB video frame and its IR frame (both BGR, as cv2 decodes video) stacked as `load_pair` stacks a pair:
    IR as one gray channel (`channels` 4) or three (6), resized to the RGB frame."""
    if channels == 4:
        ir = cv2.cvtColor(ir, cv2.COLOR_BGR2GRAY)
    if ir.shape[:2] != rgb.shape[:2]:
        ir = cv2.resize(ir, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    return stack_pair(rgb, ir)


@dataclass(frozen=True)
class WithIR:
    """An RGB source and the IR source given for it (predict's `ir=`), carried through stock `predict` to the
    predictor's `setup_source`."""

    rgb: str | Path
    ir: str | Path


def explicit_ir(source, ir) -> Path | None:
    """`ir=` checked against its RGB source: an image or video file for a file, a folder for a folder. None when
    `ir` is None: the pairing rule finds each partner."""
    if ir is None:
        return None
    ir = Path(ir)
    if not ir.exists():
        raise DatasetError(f"{ir}: IR source not found; fix ir=")

    def media(path: Path) -> bool:
        return path.is_file() and path.suffix[1:].lower() in IMG_FORMATS | VID_FORMATS

    rgb = Path(source) if isinstance(source, (str, Path)) else None
    if rgb is None or not (rgb.is_dir() and ir.is_dir() or media(rgb) and media(ir)):
        raise DatasetError(
            f"{ir}: ir= takes an image or video file when source= is one, a folder when source= is a folder "
            f"(source={source})"
        )
    return ir


def paired_frames(rgb: str, ir: Path) -> int:
    """The frames a video and its IR video have together; one line when the IR video is missing or unreadable, or
    when the frame counts say the two are not one recording."""
    if not ir.is_file():
        raise DatasetError(f"{ir}: IR video for {Path(rgb).name} is missing; add it")
    caps = cv2.VideoCapture(rgb), cv2.VideoCapture(str(ir))
    try:
        if not caps[1].isOpened():
            raise DatasetError(f"{ir}: IR video cannot be opened; re-encode it")
        n_rgb, n_ir = (int(c.get(cv2.CAP_PROP_FRAME_COUNT)) for c in caps)
    finally:
        for cap in caps:
            cap.release()
    if abs(n_rgb - n_ir) > MAX_FRAME_GAP:
        raise DatasetError(f"{ir}: IR video has {n_ir} frames but {rgb} has {n_rgb}; give the pair the same frames")
    return min(n_rgb, n_ir)


class PairedSource(LoadImagesAndVideos):
    """Stock `LoadImagesAndVideos` (same sources, batching and video bookkeeping) that yields stacked pairs,
    H x W x `channels` with R, G, B, then IR, instead of BGR frames. Every pair is checked before the first
    prediction (IR partner present and readable, video frame counts alike); a bad one stops it with one line naming
    the file. `ir`: see `explicit_ir`."""

    def __init__(self, source, batch: int = 1, vid_stride: int = 1, channels: int = 4, ir=None):
        items = source if isinstance(source, (list, tuple)) else [source]
        for item in items:  # a stream, webcam, array or image object has no IR partner to find
            if not isinstance(item, (str, Path)) or "://" in str(item) or str(item).isnumeric():
                what = f"'{item}'" if isinstance(item, (str, int)) else f"a {type(item).__name__}"
                raise DatasetError(
                    f"predict got {what}: it reads RGB image or video files and finds each IR partner under "
                    f"{IR_DIR}/; pass the RGB file, folder, glob or list of files"
                )
        self.channels, self.ir_cap, self.ir = channels, None, explicit_ir(source, ir)
        super().__init__(source, batch=batch, vid_stride=vid_stride, channels=channels)  # opens the first video
        self.source_type = SourceTypes()  # files: neither stream, screenshot, in-memory image nor tensor
        for rgb, video in zip(self.files, self.video_flag):  # every partner, before the first prediction
            if video:
                paired_frames(rgb, self.ir_partner(rgb))
            else:
                check_ir_header(rgb, self.ir_partner(rgb))  # exists, readable, 8-bit: as the training check does

    def ir_partner(self, rgb: str) -> Path:
        """The IR file of an RGB file: `ir=` itself, its namesake in the `ir=` folder, or by the pairing rule."""
        if self.ir is None:
            return ir_path(rgb)
        return partner_in(self.ir, rgb) if self.ir.is_dir() else self.ir

    def _new_video(self, path: str):
        """Open the RGB video and its IR partner, for the frames they have together."""
        ir = self.ir_partner(path)
        frames = paired_frames(path, ir)
        super()._new_video(path)
        self.ir_cap = cv2.VideoCapture(str(ir))
        self.frames = frames // self.vid_stride

    def _read_frame_pair(self, path: str) -> np.ndarray | None:
        """The next pair of frames, or None when the video is done; one line if one of the two ended first."""
        for _ in range(self.vid_stride):
            rgb_ok, ir_ok = self.cap.grab(), self.ir_cap.grab()
            if not (rgb_ok and ir_ok):
                break
        if rgb_ok and ir_ok:
            (rgb_ok, rgb), (ir_ok, ir) = self.cap.retrieve(), self.ir_cap.retrieve()
        if rgb_ok != ir_ok:
            ended = path if not rgb_ok else self.ir_partner(path)
            LOGGER.warning(f"{ended}: video ended after frame {self.frame}, before its partner; stopping this pair")
        return stack_frames(rgb, ir, self.channels) if rgb_ok and ir_ok else None

    def __next__(self) -> tuple[list[str], list[np.ndarray], list[str]]:
        """The next batch of (paths, pairs, info); images and video frames, or two videos, never share a batch."""
        paths, pairs, info = [], [], []
        while len(pairs) < self.bs and self.count < self.nf:
            path = self.files[self.count]
            if not self.video_flag[self.count]:
                self.mode = "image"
                pairs.append(load_pair(path, self.channels, ir_file=self.ir_partner(path))[0])  # full size, for results
                paths.append(path)
                info.append(f"image {self.count + 1}/{self.nf} {path}: ")
                self.count += 1
                if self.count == self.ni:
                    break
                continue
            self.mode = "video"
            if not self.cap or not self.cap.isOpened():
                self._new_video(path)
            pair = self._read_frame_pair(path)
            if pair is not None:
                self.frame += 1
                pairs.append(pair)
                paths.append(path)
                info.append(f"video {self.count + 1}/{self.nf} (frame {self.frame}/{self.frames}) {path}: ")
            if pair is None or self.frame == self.frames:
                self.close()
                self.count += 1
                if pairs:
                    break
        if not pairs:
            raise StopIteration
        return paths, pairs, info

    def close(self):
        super().close()
        if self.ir_cap:
            self.ir_cap.release()
