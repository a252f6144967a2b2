"""What an encoded image is, and how large, from its first bytes: no pixel is decoded.

The type is decided by content (magic bytes), never by the file name, so a GIF named `.jpg` and a
`.gif` are treated the same. The size comes from the format's header, so an image declaring more than
`max_pixels` (a "pixel bomb": a 100 KB PNG declaring 30000x30000) is refused before a decoder allocates
gigabytes for it. Formats: those OpenCV decodes that face datasets use (JPEG, PNG, GIF, BMP, WebP, TIFF,
PNM); anything else is not an image here.
"""

from __future__ import annotations

import struct

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "HEADER_BYTES",
    "add_max_pixels_option",
    "image_format",
    "image_size",
    "size_problem",
]

# Far above any real photo (a 50-megapixel camera is 8688x5792 = 50.3 MP: raise it for such sources);
# a decoded image of this size is 120 MB of BGR pixels.
DEFAULT_MAX_PIXELS = 40_000_000
HEADER_BYTES = 32  # enough to tell the format (the size may need more: JPEG's frame header comes later)

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def image_format(data: bytes) -> str | None:
    """ "jpeg", "png", "gif", "bmp", "webp", "tiff" or "pnm" from the magic bytes; None for anything else."""
    head = bytes(data[:HEADER_BYTES])
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "pnm"
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a recognised image; None when unknown or unreadable."""
    from facepipe.data.align.codec import jpeg_size

    kind = image_format(data)
    try:
        if kind == "jpeg":
            return jpeg_size(bytes(data))
        readers = {"png": _png, "gif": _gif, "bmp": _bmp, "webp": _webp, "tiff": _tiff, "pnm": _pnm}
        return readers[kind](memoryview(data)) if kind in readers else None
    except (struct.error, ValueError, IndexError):
        return None


def size_problem(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str] | None:
    """Why these bytes must not be decoded, as (code, text): "not_an_image", "no_size" (a known format
    whose header gives no size) or "too_large"; None when they may be."""
    kind = image_format(data)
    if kind is None:
        return "not_an_image", "not an image (no known image signature in its first bytes)"
    size = image_size(data)
    if size is None or min(size) <= 0:
        return "no_size", f"{kind} header gives no readable image size"
    width, height = size
    if width * height > max_pixels:
        return "too_large", (
            f"{kind} declares {width}x{height} = {width * height} pixels, above the limit of {max_pixels} "
            "(raise --max-pixels if it is a real photo)"
        )
    return None


def _png(data: memoryview) -> tuple[int, int] | None:
    if bytes(data[12:16]) != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _gif(data: memoryview) -> tuple[int, int]:
    # the logical screen: the canvas a decoder allocates (frames must lie inside it)
    return struct.unpack("<HH", data[6:10])


def _bmp(data: memoryview) -> tuple[int, int]:
    (dib,) = struct.unpack("<I", data[14:18])
    if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)  # a negative height means top-down rows


def _webp(data: memoryview) -> tuple[int, int] | None:
    chunk = bytes(data[12:16])
    if chunk == b"VP8X":  # extended: 24-bit (size - 1) fields
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L":  # lossless: 14-bit (size - 1) fields after the 0x2f signature
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the key-frame start code
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _tiff(data: memoryview) -> tuple[int, int] | None:
    order = "<" if bytes(data[:2]) == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    found = {}
    for i in range(count):
        tag, kind, _, value = struct.unpack(order + "HHI4s", data[ifd + 2 + 12 * i : ifd + 14 + 12 * i])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value[: 2 if kind == 3 else 4])[0]
    return (found[256], found[257]) if 256 in found and 257 in found else None


def _pnm(data: memoryview) -> tuple[int, int] | None:
    tokens: list[int] = []
    text = bytes(data[2:4096])
    for line in text.splitlines():
        for word in line.split(b"#", 1)[0].split():
            tokens.append(int(word))
            if len(tokens) == 2:
                return tokens[0], tokens[1]
    return None


def add_max_pixels_option(parser) -> None:
    """The `--max-pixels` option of the commands that decode images (align, decode --validate)."""
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse (reject) an image whose header declares more pixels, before decoding it "
        "(default: %(default)s)",
    )
