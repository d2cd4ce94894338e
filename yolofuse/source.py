"""Prediction sources as RGB+IR pairs: image files, folders, globs, lists and videos, each with its IR partner.

The IR partner is found by the dataset's pairing rule (`images/` -> `imagesIR/`, same name). Images are read with
`data.load_pair` at full size (the predictor reads the model's input again at its size, as training does). A video
is read frame by frame beside its IR video.
"""

from pathlib import Path

import cv2
import numpy as np
from ultralytics.data.loaders import LoadImagesAndVideos, SourceTypes
from ultralytics.utils import LOGGER

from yolofuse.data import IR_DIR, DatasetError, check_ir_header, ir_layers, ir_path, load_pair, stack_pair

MAX_FRAME_GAP = 1  # RGB and IR videos whose frame counts differ by more are not one recording


def stack_frames(rgb: np.ndarray, ir: np.ndarray, channels: int) -> np.ndarray:
    """An RGB video frame and its IR frame (both BGR, as cv2 decodes video) stacked as `load_pair` stacks a pair:
    IR as one gray channel (`channels` 4) or three (6), resized to the RGB frame."""
    ir = ir_layers(ir, channels)
    if ir.shape[:2] != rgb.shape[:2]:
        ir = cv2.resize(ir, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    return stack_pair(rgb, ir)


def ir_video(rgb: str) -> Path:
    """The IR video of an RGB one, by the pairing rule (same file name); one line naming it when it is missing."""
    ir = ir_path(rgb)
    if not ir.is_file():
        raise DatasetError(f"{ir}: IR video for {Path(rgb).name} is missing; add it under {IR_DIR}/ with the same name")
    return ir


class PairedSource(LoadImagesAndVideos):
    """Stock `LoadImagesAndVideos` (same sources, batching and video bookkeeping) that yields stacked pairs,
    H x W x `channels` with R, G, B, then IR, instead of BGR frames. A missing IR partner stops it before any
    prediction, with one line naming the file."""

    def __init__(self, source, batch: int = 1, vid_stride: int = 1, channels: int = 4):
        items = source if isinstance(source, (list, tuple)) else [source]
        for item in items:  # a stream, webcam, array or image object has no IR partner to find
            if not isinstance(item, (str, Path)) or "://" in str(item) or str(item).isnumeric():
                what = f"'{item}'" if isinstance(item, (str, int)) else f"a {type(item).__name__}"
                raise DatasetError(
                    f"predict got {what}: it reads RGB image or video files and finds each IR partner under "
                    f"{IR_DIR}/; pass the RGB file, folder, glob or list of files"
                )
        self.channels, self.ir_cap = channels, None
        super().__init__(source, batch=batch, vid_stride=vid_stride, channels=channels)
        self.source_type = SourceTypes()  # files: neither stream, screenshot, in-memory image nor tensor
        for rgb, video in zip(self.files, self.video_flag):  # every partner, before the first prediction
            if video:
                ir_video(rgb)
            else:
                check_ir_header(rgb)  # exists, readable, 8-bit: as the training check does

    def _new_video(self, path: str):
        """Open the RGB video and its IR partner; refuse a pair whose frame counts say it is not one recording."""
        ir = ir_video(path)
        super()._new_video(path)
        self.ir_cap = cv2.VideoCapture(str(ir))
        if not self.ir_cap.isOpened():
            raise DatasetError(f"{ir}: IR video cannot be opened; re-encode it")
        n_rgb, n_ir = (int(c.get(cv2.CAP_PROP_FRAME_COUNT)) for c in (self.cap, self.ir_cap))
        if abs(n_rgb - n_ir) > MAX_FRAME_GAP:
            self.close()
            raise DatasetError(
                f"{ir}: IR video has {n_ir} frames but {path} has {n_rgb}; give the pair the same frames"
            )
        self.frames = min(n_rgb, n_ir) // self.vid_stride

    def _read_frame_pair(self, path: str) -> np.ndarray | None:
        """The next pair of frames, or None when the video is done; one line if one of the two ended first."""
        for _ in range(self.vid_stride):
            rgb_ok, ir_ok = self.cap.grab(), self.ir_cap.grab()
            if not (rgb_ok and ir_ok):
                break
        if rgb_ok and ir_ok:
            (rgb_ok, rgb), (ir_ok, ir) = self.cap.retrieve(), self.ir_cap.retrieve()
        if rgb_ok != ir_ok:
            ended = path if not rgb_ok else ir_path(path)
            LOGGER.warning(f"{ended}: video ended after frame {self.frame}, before its partner; stopping this pair")
        return stack_frames(rgb, ir, self.channels) if rgb_ok and ir_ok else None

    def __next__(self) -> tuple[list[str], list[np.ndarray], list[str]]:
        """The next batch of (paths, pairs, info); images and video frames, or two videos, never share a batch."""
        paths, pairs, info = [], [], []
        while len(pairs) < self.bs and self.count < self.nf:
            path = self.files[self.count]
            if not self.video_flag[self.count]:
                self.mode = "image"
                pairs.append(load_pair(path, self.channels)[0])  # full size, for the results
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
