"""Camera frames → RGB arrays for vision-language models, without ROS.

A camera publishes far more often than anyone asks a question, so the vision node keeps only the
newest frame *undecoded* (:class:`RawImage` / :class:`EncodedImage` hold a reference to the message
payload, no copy) in a :class:`FrameSlot`, and pays for decoding when a question arrives:

* :func:`decode_raw` turns a ``sensor_msgs/Image`` payload into an RGB ``uint8`` array of shape
  H x W x 3 with numpy views over the buffer (row padding skipped by striding, not copying) and at
  most one OpenCV colour conversion.
* :func:`decode_compressed` does the same for ``sensor_msgs/CompressedImage`` (JPEG, PNG).
* :func:`check_frame` finds what is wrong with a frame's header (sizes, step, encoding, format,
  file signature) in microseconds, so a node can warn at once without decoding every frame.
* :func:`fit_image` bounds the image size before the model's own processor sees it.

Every problem with an image raises :class:`~slm_ros.core.errors.ImageError` naming it (sizes, step,
encoding, which bytes); bad settings raise :class:`~slm_ros.core.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Dict, Optional, Tuple, Union

import cv2
import numpy as np

from slm_ros.core.errors import ConfigError, ImageError

#: Anything exposing the buffer protocol (bytes, bytearray, memoryview, array.array, ndarray).
Buffer = Any


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one encoding lays out a pixel in memory and how it becomes RGB."""

    samples: int                 # samples per pixel in the buffer (2 for packed YUV 4:2:2)
    bytes_per_sample: int        # 1, or 2 for 16-bit encodings
    to_rgb: Optional[int]        # cv2.cvtColor code; None when the samples already are R, G, B
    note: str = ""               # what the encoding is, for the list of supported encodings


# ROS names (sensor_msgs/image_encodings.hpp) → layout. The generic OpenCV types 8UC1/8UC3/8UC4
# and 16UC1 carry no colour order; they are read in OpenCV's own BGR order, which is what
# cv_bridge.cv2_to_imgmsg(img) produces for an image it was given without an encoding.
_LAYOUTS: Dict[str, _Layout] = {
    "rgb8": _Layout(3, 1, None),
    "bgr8": _Layout(3, 1, cv2.COLOR_BGR2RGB),
    "rgba8": _Layout(4, 1, cv2.COLOR_RGBA2RGB),
    "bgra8": _Layout(4, 1, cv2.COLOR_BGRA2RGB),
    "mono8": _Layout(1, 1, cv2.COLOR_GRAY2RGB),
    "rgb16": _Layout(3, 2, None),
    "bgr16": _Layout(3, 2, cv2.COLOR_BGR2RGB),
    "rgba16": _Layout(4, 2, cv2.COLOR_RGBA2RGB),
    "bgra16": _Layout(4, 2, cv2.COLOR_BGRA2RGB),
    "mono16": _Layout(1, 2, cv2.COLOR_GRAY2RGB),
    # REP/sensor_msgs: "yuv422" is UYVY byte order, "yuv422_yuy2" is YUYV; newer distros add the
    # unambiguous names "uyvy" and "yuyv".
    "yuv422": _Layout(2, 1, cv2.COLOR_YUV2RGB_UYVY, "UYVY"),
    "uyvy": _Layout(2, 1, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": _Layout(2, 1, cv2.COLOR_YUV2RGB_YUYV, "YUYV"),
    "yuyv": _Layout(2, 1, cv2.COLOR_YUV2RGB_YUYV),
    "bayer_rggb8": _Layout(1, 1, cv2.COLOR_BayerRGGB2RGB),
    "bayer_bggr8": _Layout(1, 1, cv2.COLOR_BayerBGGR2RGB),
    "bayer_gbrg8": _Layout(1, 1, cv2.COLOR_BayerGBRG2RGB),
    "bayer_grbg8": _Layout(1, 1, cv2.COLOR_BayerGRBG2RGB),
    "8UC1": _Layout(1, 1, cv2.COLOR_GRAY2RGB, "as mono8"),
    "8UC3": _Layout(3, 1, cv2.COLOR_BGR2RGB, "as bgr8"),
    "8UC4": _Layout(4, 1, cv2.COLOR_BGRA2RGB, "as bgra8"),
    "16UC1": _Layout(1, 2, cv2.COLOR_GRAY2RGB, "as mono16"),
}

#: Encodings :func:`decode_raw` accepts.
SUPPORTED_ENCODINGS: Tuple[str, ...] = tuple(_LAYOUTS)

#: Compressed formats :func:`decode_compressed` accepts.
SUPPORTED_COMPRESSED: Tuple[str, ...] = ("jpeg", "png")

#: Policies of :func:`fit_image`.
FIT_POLICIES: Tuple[str, ...] = ("none", "downscale", "pad_square")

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# OpenCV >= 4.11 decodes straight to RGB; older versions decode to BGR and need one conversion.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def _supported_list() -> str:
    names = []
    for name, layout in _LAYOUTS.items():
        names.append(f"{name} ({layout.note})" if layout.note else name)
    return ", ".join(names)


def _as_bytes_array(data: Buffer) -> np.ndarray:
    """A flat uint8 view of ``data`` (no copy for buffer-protocol objects)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if isinstance(data, (list, tuple)):
        # rclpy hands uint8[] over as array.array or bytes; a list is a slow, rare path.
        return np.asarray(data, dtype=np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"image data of type {type(data).__name__} is not a byte buffer") from exc


def _check_raw(encoding: str, width: int, height: int, step: int, data: Buffer
               ) -> Tuple[_Layout, np.ndarray]:
    """The layout and a flat byte view of a raw image, after the O(1) checks; see decode_raw."""
    layout = _LAYOUTS.get(encoding)
    if layout is None:
        raise ImageError(f"unsupported image encoding {encoding!r}; supported: {_supported_list()}")
    width, height, step = int(width), int(height), int(step)
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size: width {width} x height {height}")
    pixel_bytes = layout.samples * layout.bytes_per_sample
    if layout.samples == 2 and width % 2:
        raise ImageError(f"{encoding} packs two pixels in 4 bytes, so the width must be even; "
                         f"got width {width}")
    row_bytes = width * pixel_bytes
    if step < row_bytes:
        raise ImageError(f"step {step} is smaller than width {width} x {pixel_bytes} bytes per "
                         f"pixel = {row_bytes} for {encoding}")
    buf = _as_bytes_array(data)
    if buf.size != step * height:
        raise ImageError(f"image data is {buf.size} bytes but step x height = {step} x {height} = "
                         f"{step * height} ({encoding}, {width}x{height})")
    return layout, buf


def decode_raw(encoding: str, width: int, height: int, step: int, data: Buffer,
               is_bigendian: bool = False) -> np.ndarray:
    """Convert the fields of a ``sensor_msgs/Image`` into an RGB ``uint8`` array (H x W x 3).

    ``step`` is the row length in bytes; rows longer than ``width`` pixels (padding) are skipped by
    striding over the buffer. 16-bit encodings keep their high byte (value >> 8), honouring
    ``is_bigendian``. The result never shares memory with ``data``.

    Raises :class:`ImageError` for zero sizes, an unknown encoding, ``step`` too small for the
    width, ``data`` not ``step * height`` bytes long, or a width the encoding cannot have (odd for
    YUV 4:2:2).
    """
    layout, buf = _check_raw(encoding, width, height, step, data)
    width, height, step = int(width), int(height), int(step)
    row_bytes = width * layout.samples * layout.bytes_per_sample
    rows = buf.reshape(height, step)[:, :row_bytes]
    if layout.bytes_per_sample == 2:
        # The high byte of each sample is value >> 8: pick it by striding instead of shifting.
        rows = rows[:, 0::2] if is_bigendian else rows[:, 1::2]
    if layout.to_rgb is None:
        return np.array(rows.reshape(height, width, 3))
    pixels = rows if layout.samples == 1 else rows.reshape(height, width, layout.samples)
    if layout.bytes_per_sample == 2:
        # OpenCV accepts padded rows but not a stride between the samples of a row.
        pixels = np.ascontiguousarray(pixels)
    try:
        return cv2.cvtColor(pixels, layout.to_rgb)
    except cv2.error as exc:
        raise ImageError(f"could not convert a {width}x{height} {encoding} image to RGB: "
                         f"{str(exc).strip().splitlines()[-1]}") from exc


def _check_compressed(format: str, data: Buffer) -> Tuple[np.ndarray, str]:  # noqa: A002
    """A flat byte view of compressed data and its actual kind (jpeg/png), after the O(1) checks
    on the format and the file signature; see decode_compressed."""
    fmt = (format or "").strip().lower()
    if "compresseddepth" in fmt:
        raise ImageError(f"compressed format {format!r} is a depth map, not a camera image; "
                         f"supported: {', '.join(SUPPORTED_COMPRESSED)}")
    declared = ("jpeg" if "jpeg" in fmt or "jpg" in fmt else "png" if "png" in fmt else "")
    if fmt and not declared:
        raise ImageError(f"unsupported compressed image format {format!r}; supported: "
                         f"{', '.join(SUPPORTED_COMPRESSED)}")
    buf = _as_bytes_array(data)
    if buf.size == 0:
        raise ImageError(f"compressed image ({format or 'no format'}) has no data")
    head = buf[:8].tobytes()
    actual = ("jpeg" if head.startswith(_JPEG_MAGIC) else "png" if head.startswith(_PNG_MAGIC)
              else "")
    if not actual:
        raise ImageError(f"corrupt compressed image: {buf.size} bytes declared as "
                         f"{declared or 'unknown'} start with {head[:4].hex(' ')}, which is "
                         f"neither a JPEG nor a PNG signature")
    return buf, actual


def decode_compressed(format: str, data: Buffer) -> np.ndarray:  # noqa: A002 - the ROS field name
    """Convert a ``sensor_msgs/CompressedImage`` (JPEG or PNG) into an RGB ``uint8`` array.

    ``format`` is the message's field: ``jpeg``, ``png``, or image_transport's ``"bgr8; jpeg
    compressed bgr8"`` style; empty means "look at the data". The data's own signature decides how
    it is decoded. Raises :class:`ImageError` for an unsupported format (e.g. compressedDepth),
    empty data, data that is not JPEG/PNG, or data that does not decode (corrupt, truncated).
    """
    buf, actual = _check_compressed(format, data)
    flag = _IMREAD_RGB if _IMREAD_RGB is not None else cv2.IMREAD_COLOR
    try:
        image = cv2.imdecode(buf, flag)
    except cv2.error as exc:
        raise ImageError(f"corrupt {actual.upper()} image ({buf.size} bytes): "
                         f"{str(exc).strip().splitlines()[-1]}") from exc
    if image is None:
        raise ImageError(f"corrupt or truncated {actual.upper()} image: OpenCV could not decode "
                         f"its {buf.size} bytes")
    if _IMREAD_RGB is None:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def compressed_dimensions(data: Buffer) -> Optional[Tuple[int, int]]:
    """(width, height) a PNG or JPEG declares in its header, read without decoding; None when the
    header does not say (not PNG/JPEG, truncated)."""
    buf = _as_bytes_array(data)
    head = buf[:32].tobytes()
    if head.startswith(_PNG_MAGIC) and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not head.startswith(_JPEG_MAGIC):
        return None
    i, n = 2, buf.size
    while i + 9 < n:   # walk the marker segments up to the frame header (SOFn)
        if buf[i] != 0xFF:
            return None
        marker = int(buf[i + 1])
        if marker == 0xFF:   # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int(buf[i + 5]) << 8 | int(buf[i + 6])
            width = int(buf[i + 7]) << 8 | int(buf[i + 8])
            return width, height
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:   # no length field
            i += 2
            continue
        i += 2 + (int(buf[i + 2]) << 8 | int(buf[i + 3]))
    return None


def check_size(frame: "Frame", max_pixels: int = 0, max_bytes: int = 0) -> None:
    """Refuse a frame larger than the limits before decoding it (0 = no limit): its data's byte
    size, and the pixels its header declares (raw: width x height; PNG/JPEG: read from the file
    header). A 656 KB PNG declaring 15000x15000 would take ~675 MB to decode."""
    size = _as_bytes_array(frame.data).size
    if max_bytes and size > max_bytes:
        raise ImageError(f"image of {size} bytes is larger than max_image_bytes ({max_bytes}); "
                         f"refused before decoding")
    dims = ((frame.width, frame.height) if isinstance(frame, RawImage)
            else compressed_dimensions(frame.data))
    if max_pixels and dims and dims[0] * dims[1] > max_pixels:
        raise ImageError(f"image of {dims[0]}x{dims[1]} = {dims[0] * dims[1]} pixels is larger than "
                         f"max_image_pixels ({max_pixels}); refused before decoding")


def check_fit(policy: str, max_side: int) -> None:
    """Validate the resize settings (node parameters); raises :class:`ConfigError`."""
    if policy not in FIT_POLICIES:
        raise ConfigError(f"image resize policy must be one of {', '.join(FIT_POLICIES)}; "
                          f"got {policy!r}")
    if not isinstance(max_side, int) or isinstance(max_side, bool) or max_side < 0:
        raise ConfigError(f"max image side must be an integer >= 0 (0 = no limit), "
                          f"got {max_side!r}")


def fit_image(rgb: np.ndarray, max_side: int, policy: str = "downscale") -> np.ndarray:
    """Bound an RGB image's size before the model's processor sees it.

    * ``none`` - unchanged.
    * ``downscale`` - keep the aspect ratio, longest side at most ``max_side`` (area interpolation);
      smaller images are never enlarged. ``max_side == 0`` means no limit.
    * ``pad_square`` - ``downscale``, then pad with black to a centred square, so processors that
      centre-crop to a square (CLIP/LLaVA) see the whole field of view.

    The model's processor still resizes to its own input size; downscaling a 1080p frame first makes
    that step cheaper and bounds the work of processors that tile large images (SmolVLM).
    """
    check_fit(policy, max_side)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"expected an RGB image of shape H x W x 3, got shape {rgb.shape}")
    if policy == "none":
        return rgb
    height, width = rgb.shape[:2]
    longest = max(height, width)
    if max_side and longest > max_side:
        scale = max_side / longest
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        height, width = rgb.shape[:2]
    if policy == "pad_square" and height != width:
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        rgb = cv2.copyMakeBorder(rgb, top, side - height - top, left, side - width - left,
                                 cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return rgb


@dataclasses.dataclass(frozen=True)
class RawImage:
    """An undecoded ``sensor_msgs/Image``: the message's fields plus when it arrived.

    ``data`` is kept by reference (no copy); :meth:`decode` does the work when it is needed.
    ``stamp_ns`` is the header stamp; ``received_monotonic`` is ``time.monotonic()`` at arrival,
    which frame-age limits use because it does not depend on the publisher's clock.
    """

    encoding: str
    width: int
    height: int
    step: int
    data: Buffer = dataclasses.field(repr=False)
    is_bigendian: bool = False
    stamp_ns: int = 0
    frame_id: str = ""
    received_monotonic: float = dataclasses.field(default_factory=time.monotonic)

    def decode(self) -> np.ndarray:
        """RGB ``uint8`` array, H x W x 3 (see :func:`decode_raw`)."""
        return decode_raw(self.encoding, self.width, self.height, self.step, self.data,
                          self.is_bigendian)


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """An undecoded ``sensor_msgs/CompressedImage`` (JPEG/PNG) plus when it arrived."""

    format: str
    data: Buffer = dataclasses.field(repr=False)
    stamp_ns: int = 0
    frame_id: str = ""
    received_monotonic: float = dataclasses.field(default_factory=time.monotonic)

    def decode(self) -> np.ndarray:
        """RGB ``uint8`` array, H x W x 3 (see :func:`decode_compressed`)."""
        return decode_compressed(self.format, self.data)


#: A frame as the vision node stores it: raw or compressed, decoded on demand.
Frame = Union[RawImage, EncodedImage]


def check_frame(frame: Frame) -> str:
    """What is wrong with a frame, found without decoding it (sizes, step, data length, encoding,
    compressed format and file signature); ``""`` when nothing is.

    Cheap enough for every camera message (microseconds, no copy), so a node can warn about a
    misconfigured camera at once instead of on the next question. Corrupt pixel data past the
    header is only found by :meth:`RawImage.decode` / :meth:`EncodedImage.decode`.
    """
    try:
        if isinstance(frame, RawImage):
            _check_raw(frame.encoding, frame.width, frame.height, frame.step, frame.data)
        elif isinstance(frame, EncodedImage):
            _check_compressed(frame.format, frame.data)
        else:
            return f"not a camera frame: {type(frame).__name__}"
    except ImageError as exc:
        return str(exc)
    return ""


class FrameSlot:
    """The newest frame of a camera stream, undecoded. Thread-safe.

    The camera callback calls :meth:`put` (a reference swap under a lock: constant cost whatever the
    frame rate); whoever answers a question calls :meth:`take`, which enforces the age limit.
    """

    def __init__(self, source: str = "camera") -> None:
        self._source = source
        self._frame: Optional[Frame] = None
        self._received = 0
        self._lock = threading.Lock()

    def put(self, frame: Frame) -> None:
        """Replace the stored frame."""
        with self._lock:
            self._frame = frame
            self._received += 1

    def latest(self) -> Optional[Frame]:
        """The newest frame, or None before the first one."""
        with self._lock:
            return self._frame

    @property
    def received(self) -> int:
        """Frames received since construction."""
        with self._lock:
            return self._received

    def clear(self) -> None:
        """Forget the stored frame (e.g. when the node deactivates)."""
        with self._lock:
            self._frame = None

    def take(self, max_age_s: float = 0.0, now: Optional[float] = None) -> Frame:
        """The newest frame, no older than ``max_age_s`` seconds (0 = any age) by arrival time.

        Raises :class:`ImageError` when no frame has arrived yet or the newest one is too old.
        """
        frame = self.latest()
        if frame is None:
            raise ImageError(f"no image received yet on {self._source}")
        if max_age_s > 0:
            age = (time.monotonic() if now is None else now) - frame.received_monotonic
            if age > max_age_s:
                raise ImageError(f"newest image on {self._source} is {age:.2f} s old, older than "
                                 f"the {max_age_s:g} s limit (is the camera still publishing?)")
        return frame
