"""Tier 1: camera image decoding and resizing (slm_ros.core.vision), checked against data built
independently with numpy / OpenCV encoders."""

import array

import cv2
import numpy as np
import pytest

from slm_ros.core.errors import ConfigError, ImageError, RequestError
from slm_ros.core.vision import (
    SUPPORTED_ENCODINGS,
    EncodedImage,
    FrameSlot,
    RawImage,
    check_frame,
    decode_compressed,
    decode_raw,
    fit_image,
)

H, W = 37, 50   # odd height, even width (YUV 4:2:2 needs an even width)


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def rgb16():
    return np.random.default_rng(1).integers(0, 65536, (H, W, 3), dtype=np.uint16)


def pad_rows(packed: np.ndarray, extra: int) -> bytes:
    """Row-major bytes of ``packed`` (H x row bytes) with ``extra`` junk bytes after every row."""
    rows = packed.reshape(packed.shape[0], -1)
    junk = np.full((rows.shape[0], extra), 0xAB, dtype=np.uint8)
    return np.hstack([rows, junk]).tobytes()


def as_bytes(a: np.ndarray) -> np.ndarray:
    """Raw bytes of an array, one row per image row."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(a.shape[0], -1)


def gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def encoded_cases(rgb, rgb16):
    """(encoding, row-bytes array, is_bigendian, expected RGB) for every raw encoding."""
    alpha = np.random.default_rng(2).integers(0, 256, (H, W, 1), dtype=np.uint8)
    bgr = rgb[:, :, ::-1]
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    mono16 = rgb16[:, :, 0]
    high = (rgb16 >> 8).astype(np.uint8)
    cases = [
        ("rgb8", as_bytes(rgb), False, rgb),
        ("bgr8", as_bytes(bgr), False, rgb),
        ("8UC3", as_bytes(bgr), False, rgb),
        ("rgba8", as_bytes(np.dstack([rgb, alpha])), False, rgb),
        ("bgra8", as_bytes(np.dstack([bgr, alpha])), False, rgb),
        ("8UC4", as_bytes(np.dstack([bgr, alpha])), False, rgb),
        ("mono8", as_bytes(gray), False, gray3(gray)),
        ("8UC1", as_bytes(gray), False, gray3(gray)),
        ("mono16", as_bytes(mono16.astype("<u2")), False, gray3(high[:, :, 0])),
        ("mono16", as_bytes(mono16.astype(">u2")), True, gray3(high[:, :, 0])),
        ("16UC1", as_bytes(mono16.astype("<u2")), False, gray3(high[:, :, 0])),
        ("rgb16", as_bytes(rgb16.astype("<u2")), False, high),
        ("rgb16", as_bytes(rgb16.astype(">u2")), True, high),
        ("bgr16", as_bytes(rgb16[:, :, ::-1].astype("<u2")), False, high),
        ("rgba16", as_bytes(np.dstack([rgb16, rgb16[:, :, :1]]).astype(">u2")), True, high),
        ("bgra16", as_bytes(np.dstack([rgb16[:, :, ::-1], rgb16[:, :, :1]]).astype("<u2")),
         False, high),
    ]
    return cases


def test_every_exact_encoding_matches_ground_truth(rgb, rgb16):
    cases = encoded_cases(rgb, rgb16)
    covered = {c[0] for c in cases}
    for encoding, packed, big, expected in cases:
        step = packed.shape[1]
        out = decode_raw(encoding, W, H, step, packed.tobytes(), big)
        assert out.dtype == np.uint8 and out.shape == (H, W, 3), encoding
        np.testing.assert_array_equal(out, expected, err_msg=f"{encoding} big={big}")
        # Padded rows (step > width x bytes per pixel) give the same image.
        for extra in (1, 7, 64):
            out = decode_raw(encoding, W, H, step + extra, pad_rows(packed, extra), big)
            np.testing.assert_array_equal(out, expected, err_msg=f"{encoding} +{extra}")
    yuv_and_bayer = {e for e in SUPPORTED_ENCODINGS if "yu" in e or "uyvy" in e or "bayer" in e}
    assert covered | yuv_and_bayer == set(SUPPORTED_ENCODINGS)


def pack_422(y: np.ndarray, u: np.ndarray, v: np.ndarray, order: str) -> np.ndarray:
    """Pack full-width Y and half-width U/V planes into 4:2:2 bytes, H x (2 W)."""
    h, w = y.shape
    out = np.empty((h, w // 2, 4), dtype=np.uint8)
    for i, name in enumerate(order):   # e.g. "UYVY": U, Y0, V, Y1
        if name == "U":
            out[:, :, i] = u
        elif name == "V":
            out[:, :, i] = v
        else:
            out[:, :, i] = y[:, 0::2] if order.index("Y") == i else y[:, 1::2]
    return out.reshape(h, w * 2)


@pytest.mark.parametrize("encoding,order", [("yuv422", "UYVY"), ("uyvy", "UYVY"),
                                            ("yuv422_yuy2", "YUYV"), ("yuyv", "YUYV")])
def test_yuv422_byte_orders(encoding, order):
    # BT.601 video range: Y 16..235, chroma centred on 128. Flat colours with known RGB values.
    colours = {(235, 128, 128): (255, 255, 255), (16, 128, 128): (0, 0, 0),
               (126, 128, 128): (128, 128, 128), (81, 90, 240): (255, 0, 0),
               (145, 54, 34): (0, 255, 0), (41, 240, 110): (0, 0, 255)}
    for (y, u, v), expected in colours.items():
        planes = (np.full((4, 8), y, np.uint8), np.full((4, 4), u, np.uint8),
                  np.full((4, 4), v, np.uint8))
        packed = pack_422(*planes, order)
        out = decode_raw(encoding, 8, 4, 16, packed.tobytes())
        assert np.abs(out.astype(int) - expected).max() <= 2, (encoding, (y, u, v), out[0, 0])
    # Byte order matters: a ramp in Y must come back as a ramp, not mixed with chroma.
    y = np.tile(np.arange(16, 16 + 8 * 25, 25, dtype=np.uint8), (2, 1))
    flat = np.full((2, 4), 128, np.uint8)
    out = decode_raw(encoding, 8, 2, 16, pack_422(y, flat, flat, order).tobytes())
    assert np.all(np.diff(out[0, :, 0].astype(int)) > 0)
    assert np.abs(out[:, :, 0].astype(int) - out[:, :, 2]).max() <= 1


@pytest.mark.parametrize("encoding,to_yuv", [("yuv422", cv2.COLOR_RGB2YUV_UYVY),
                                             ("yuv422_yuy2", cv2.COLOR_RGB2YUV_YUYV)])
def test_yuv422_round_trip_through_opencv_encoder(rgb, encoding, to_yuv):
    # Chroma is shared by pixel pairs, so give both pixels of a pair the same colour.
    pairs = np.repeat(rgb[:, 0::2], 2, axis=1)
    packed = cv2.cvtColor(pairs, to_yuv)
    assert packed.shape == (H, W, 2)
    out = decode_raw(encoding, W, H, W * 2, packed.tobytes())
    assert np.abs(out.astype(int) - pairs).max() <= 6   # video-range quantisation
    padded = decode_raw(encoding, W, H, W * 2 + 6, pad_rows(packed, 6))
    np.testing.assert_array_equal(padded, out)


@pytest.mark.parametrize("encoding", ["bayer_rggb8", "bayer_bggr8", "bayer_gbrg8", "bayer_grbg8"])
def test_bayer_patterns_keep_colours(encoding):
    colour = np.array([200, 120, 40], dtype=np.uint8)
    pattern = encoding.split("_")[1][:4].upper()     # e.g. RGGB: top-left 2x2 cell, row-major
    channel = {"R": 0, "G": 1, "B": 2}
    mosaic = np.empty((8, 12), dtype=np.uint8)
    for i, name in enumerate(pattern):
        mosaic[i // 2::2, i % 2::2] = colour[channel[name]]
    out = decode_raw(encoding, 12, 8, 12, mosaic.tobytes())
    np.testing.assert_array_equal(out[2:-2, 2:-2], np.broadcast_to(colour, (4, 8, 3)))


def test_buffer_types_and_ownership(rgb):
    packed = as_bytes(rgb[:, :, ::-1])
    for data in (packed.tobytes(), bytearray(packed.tobytes()), memoryview(packed.tobytes()),
                 array.array("B", packed.tobytes()), packed, list(packed.reshape(-1)[:W * 3 * 2])):
        height = 2 if isinstance(data, list) else H
        out = decode_raw("bgr8", W, height, W * 3, data)
        np.testing.assert_array_equal(out, rgb[:height])
    source = bytearray(as_bytes(rgb).tobytes())
    out = decode_raw("rgb8", W, H, W * 3, source)
    out[:] = 0   # writable and not a view of the message buffer
    assert bytes(source) == as_bytes(rgb).tobytes()


def test_jpeg_and_png_round_trip(rgb):
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    ok, png = cv2.imencode(".png", bgr)
    assert ok
    for fmt in ("png", "PNG", "bgr8; png compressed bgr8", ""):
        np.testing.assert_array_equal(decode_compressed(fmt, png.tobytes()), rgb)
    ok, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    truth = cv2.cvtColor(cv2.imdecode(jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    for fmt in ("jpeg", "jpg", "rgb8; jpeg compressed bgr8", "", "png"):   # "png": mislabelled
        out = decode_compressed(fmt, jpg.tobytes())
        np.testing.assert_array_equal(out, truth)
    # It is the same picture (a smooth one: JPEG blurs noise and subsamples chroma).
    smooth = cv2.resize(rgb, (W * 8, H * 8), interpolation=cv2.INTER_LINEAR)
    ok, jpg = cv2.imencode(".jpg", smooth[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert np.abs(decode_compressed("jpeg", jpg.tobytes()).astype(int) - smooth).mean() < 3
    # Grey PNG becomes three equal channels.
    ok, grey_png = cv2.imencode(".png", rgb[:, :, 0])
    out = decode_compressed("png", grey_png.tobytes())
    np.testing.assert_array_equal(out, gray3(rgb[:, :, 0]))


def test_raw_image_errors_name_the_problem():
    def err(*args, **kwargs) -> str:
        with pytest.raises(ImageError) as info:
            decode_raw(*args, **kwargs)
        assert isinstance(info.value, RequestError)
        return str(info.value)

    msg = err("rgb8", 4, 2, 12, bytes(20))
    assert "20" in msg and "24" in msg and "step" in msg
    msg = err("rgb8", 4, 2, 12, bytes(30))
    assert "30" in msg and "24" in msg
    msg = err("rgb8", 4, 2, 10, bytes(20))
    assert "step 10" in msg and "12" in msg
    msg = err("mono16", 4, 2, 6, bytes(12))
    assert "step 6" in msg and "8" in msg
    msg = err("hsv8", 4, 2, 12, bytes(24))
    assert "hsv8" in msg and "rgb8" in msg and "yuv422" in msg and "mono16" in msg
    assert "zero" in err("rgb8", 0, 2, 0, b"")
    assert "zero" in err("rgb8", 4, 0, 12, b"")
    assert "even" in err("yuv422", 3, 2, 6, bytes(12))
    assert "byte buffer" in err("rgb8", 1, 1, 3, object())


def test_compressed_errors_name_the_problem(rgb):
    ok, jpg = cv2.imencode(".jpg", rgb)
    ok, png = cv2.imencode(".png", rgb)

    def err(fmt, data) -> str:
        with pytest.raises(ImageError) as info:
            decode_compressed(fmt, data)
        return str(info.value)

    assert "webp" in err("webp", jpg.tobytes()) and "jpeg, png" in err("webp", b"x")
    assert "depth" in err("16UC1; compressedDepth png", png.tobytes())
    assert "no data" in err("jpeg", b"")
    msg = err("jpeg", b"hello world, not an image")
    assert "corrupt" in msg and "signature" in msg
    assert "corrupt" in err("jpeg", jpg.tobytes()[:3] + bytes(200))
    assert "PNG" in err("png", png.tobytes()[:40])


def test_fit_image():
    image = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    out = fit_image(image, 320, "downscale")
    assert out.shape == (240, 320, 3)
    assert fit_image(image, 1000, "downscale") is image       # never enlarged
    assert fit_image(image, 0, "downscale") is image          # 0 = no limit
    assert fit_image(image, 16, "none") is image
    tall = image.transpose(1, 0, 2)
    assert fit_image(tall, 100, "downscale").shape == (100, 75, 3)
    square = fit_image(image, 320, "pad_square")
    assert square.shape == (320, 320, 3)
    np.testing.assert_array_equal(square[40:280], out)
    assert not square[:40].any() and not square[280:].any()
    assert fit_image(image[:, :480], 0, "pad_square").shape == (480, 480, 3)
    for policy, side in (("crop", 10), ("downscale", -1), ("downscale", 1.5)):
        with pytest.raises(ConfigError):
            fit_image(image, side, policy)
    with pytest.raises(ImageError, match="H x W x 3"):
        fit_image(image[:, :, 0], 10, "downscale")


def test_frames_decode_on_demand_and_slot_age(rgb):
    raw = RawImage("bgr8", W, H, W * 3, as_bytes(rgb[:, :, ::-1]).tobytes(), stamp_ns=5,
                   frame_id="cam", received_monotonic=100.0)
    np.testing.assert_array_equal(raw.decode(), rgb)
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    enc = EncodedImage("png", png.tobytes(), received_monotonic=101.0)
    np.testing.assert_array_equal(enc.decode(), rgb)
    slot = FrameSlot("/camera/image_raw")
    with pytest.raises(ImageError, match="no image received yet on /camera/image_raw"):
        slot.take()
    slot.put(raw)
    slot.put(enc)
    assert slot.received == 2 and slot.latest() is enc
    assert slot.take(max_age_s=0.5, now=101.2) is enc
    assert slot.take(now=1e9) is enc                            # 0 = any age
    with pytest.raises(ImageError, match=r"0\.90 s old.*0\.5 s limit"):
        slot.take(max_age_s=0.5, now=101.9)
    slot.clear()
    assert slot.latest() is None


def test_check_frame_finds_header_problems_without_decoding(rgb):
    good = RawImage("rgb8", W, H, W * 3, as_bytes(rgb).tobytes())
    assert check_frame(good) == ""
    assert "step x height" in check_frame(RawImage("rgb8", W, H, W * 3, b"\0" * 10))
    assert "hsv8" in check_frame(RawImage("hsv8", W, H, W * 3, as_bytes(rgb).tobytes()))
    assert "step 3" in check_frame(RawImage("rgb8", W, H, 3, bytes(3 * H)))
    ok, png = cv2.imencode(".png", rgb)
    assert check_frame(EncodedImage("png", png.tobytes())) == ""
    assert "webp" in check_frame(EncodedImage("webp", png.tobytes()))
    assert "signature" in check_frame(EncodedImage("jpeg", b"GIF89a...."))
    assert "no data" in check_frame(EncodedImage("jpeg", b""))
    # Damage after the signature is found by decoding only.
    broken = EncodedImage("jpeg", b"\xff\xd8\xff" + bytes(100))
    assert check_frame(broken) == ""
    with pytest.raises(ImageError, match="corrupt"):
        broken.decode()
    assert "not a camera frame" in check_frame(rgb)
