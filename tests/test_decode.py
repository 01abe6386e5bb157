"""Pixels decoded right, and alike, on both decode paths: PIL's (decode_sample, the build check) and the device's
(open_sample, then decode_images), for 16-bit, palette, greyscale+alpha, CMYK, RGBA and 1-bit files."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards.build import build
from shards.reader import ShardReader, decode_images, decode_sample, open_sample

GRADIENT = np.array([[0, 127, 128, 383, 384, 511, 32767, 32768, 65280, 65535]] * 2, np.uint16)  # [2, 10]


def png16(pixels: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written byte by byte (PIL writes none in colour): colour type 0 grey, 2 RGB, 6 RGBA."""
    height, width = pixels.shape[:2]
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


PALETTE = np.array([(i * 3 % 256, 255 - i, i * 7 % 256) for i in range(256)], np.uint8)


def palette_image() -> Image.Image:
    image = Image.fromarray(np.arange(20, dtype=np.uint8).reshape(2, 10), "P")
    image.putpalette(PALETTE.ravel().tolist())
    return image


def cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """Image file bytes and the 8-bit RGB [2, 10, 3] each must decode to."""
    grey = np.round(GRADIENT / 257.0).astype(np.uint8)  # 16-bit scaled by 255/65535, rounded
    high = (GRADIENT >> 8).astype(np.uint8)  # PIL reduces 16-bit colour PNGs to their high byte
    rgb16 = np.stack([GRADIENT, GRADIENT[:, ::-1], np.full_like(GRADIENT, 4660)], -1)
    rgb16_8 = np.stack([high, high[:, ::-1], np.full_like(high, 4660 >> 8)], -1)
    palette = PALETTE[np.arange(20).reshape(2, 10)]
    levels = (np.arange(20, dtype=np.uint8) * 12).reshape(2, 10)
    la = Image.fromarray(np.stack([levels, np.full_like(levels, 9)], -1), "LA")
    rgba = np.dstack([np.stack([levels, 255 - levels, levels // 2], -1), np.full_like(levels, 0)])
    bits = np.indices((2, 10)).sum(0) % 2 == 1
    cmyk = Image.new("CMYK", (10, 2), (10, 200, 30, 40))
    return {
        "16-bit grey": (png16(GRADIENT, 0), np.repeat(grey[..., None], 3, -1)),
        "16-bit RGB": (png16(rgb16, 2), rgb16_8),
        "16-bit RGBA": (png16(np.dstack([rgb16, GRADIENT]), 6), rgb16_8),
        "palette": (encode(palette_image()), palette),
        "palette + transparency": (encode(palette_image(), transparency=bytes(range(0, 200, 10))), palette),
        "greyscale + alpha": (encode(la), np.repeat(levels[..., None], 3, -1)),
        "RGBA, alpha dropped": (encode(Image.fromarray(rgba, "RGBA")), rgba[..., :3]),
        "1-bit": (encode(Image.fromarray(bits)), np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, -1)),
        # (255 - c)(255 - k) / 255, as PIL converts; JPEG keeps a flat colour within a level or two
        "CMYK JPEG": (encode(cmyk, "JPEG", quality=100), np.full((2, 10, 3), (207, 46, 190), np.uint8)),
    }


def device_path(data: bytes) -> np.ndarray:
    """What the dump's device path makes of an image file: decode_images on the device (here the CPU)."""
    decoded = decode_images([torch.frombuffer(bytearray(data), dtype=torch.uint8)], torch.device("cpu"))[0]
    assert decoded.dtype == torch.uint8 and decoded.shape[0] == 3
    return decoded.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("name", list(cases()))
def test_both_paths_decode_every_mode_to_the_same_right_pixels(name):
    data, expected = cases()[name]
    pil = np.asarray(decode_sample({"__key__": "k", "png": data, "cls": b"0"})["image"])
    assert pil.shape == expected.shape and pil.dtype == np.uint8
    tolerance = 2 if "JPEG" in name else 0
    assert np.abs(pil.astype(int) - expected).max() <= tolerance, (pil[..., 0], expected[..., 0])
    assert np.array_equal(device_path(data), pil)  # the dump's device path agrees exactly with PIL's
    opened = open_sample({"__key__": "k", "png": data, "cls": b"0"})  # training's: decoded by PIL, as PIL's path
    assert opened["jpeg"] is None and np.array_equal(np.asarray(opened["image"]), pil)


def test_exif_orientation_is_not_applied_on_either_path():
    """A 14x10 JPEG tagged "rotate 90" (orientation 6) stays 14 wide and 10 high, as timm's ImageFolder reads it."""
    pixels = np.zeros((10, 14, 3), np.uint8)
    pixels[:, :7] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6
    pil = np.asarray(decode_sample({"__key__": "k", "jpg": data, "cls": b"0"})["image"])
    device = device_path(data)
    for decoded in (pil, device):
        assert decoded.shape == (10, 14, 3) and decoded[:, :5].min() > 200 and decoded[:, 9:].max() < 50


def test_the_build_check_accepts_these_files_and_the_reader_decodes_them(tmp_path: Path):
    root = tmp_path / "folder"
    for split in ("train", "val"):
        for i, (name, (data, _)) in enumerate(cases().items()):
            path = root / split / "c" / f"{i}.{'jpg' if 'JPEG' in name else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    build(root, tmp_path / "shards", per_shard=4, seed=None, overwrite=False)
    images = {s["key"]: np.asarray(s["image"]) for s in ShardReader(tmp_path / "shards", "val")}
    for i, (_, expected) in enumerate(cases().values()):
        assert np.abs(images[f"c/{i}"].astype(int) - expected).max() <= 2
