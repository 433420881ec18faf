"""JPEG streams read without decoding them: the frame size a stream states, and whether it
ends whole. The TIFF and DICOM readers check each tile's stream with these before a decoder
allocates what it states or fills what is missing with grey."""

from __future__ import annotations

import struct

__all__ = ["jpeg_ends_whole", "jpeg_frame_size"]

# Start-of-frame markers (FF Cn): every JPEG process but DHT (C4), JPG (C8) and DAC (CC).
_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}


def jpeg_frame_size(head: bytes) -> tuple[int, int] | None:
    """``(height, width)`` in pixels that the JPEG stream beginning with ``head`` states in its
    frame header (SOF marker); None if ``head`` begins no JPEG stream or holds no SOF."""
    if head[:2] != b"\xff\xd8":  # SOI
        return None
    at = 2
    while (at := head.find(b"\xff", at)) >= 0 and at + 4 <= len(head):
        marker = head[at + 1]
        if marker in _SOF:  # FF Cn, length, precision, height, width
            if at + 9 > len(head):
                return None
            height, width = struct.unpack(">HH", head[at + 5 : at + 9])
            return int(height), int(width)
        if marker in (0xD9, 0xDA):  # EOI, or a scan before any frame header
            return None
        if marker == 0xFF:  # a fill byte before a marker
            at += 1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # RSTn, SOI, TEM: no length
            at += 2
        else:
            at += 2 + int.from_bytes(head[at + 2 : at + 4], "big")
    return None


def jpeg_ends_whole(data: bytes | memoryview) -> bool:
    """Whether a JPEG stream's last scan ends with the end-of-image marker (FF D9): byte
    stuffing keeps it out of entropy-coded data, so anything a writer put after it (zero or
    0xFF padding to a sector, a newline) is allowed, as libjpeg allows it. A stream with no
    scan is left to the decoder.

    >>> sos, eoi = b"\\xff\\xda", b"\\xff\\xd9"
    >>> [jpeg_ends_whole(s) for s in (sos + b".." + eoi, sos + b".." + eoi + b"\\n", sos + b"..")]
    [True, True, False]
    """
    data = bytes(data)
    scan = data.rfind(b"\xff\xda")
    return scan < 0 or data.find(b"\xff\xd9", scan + 2) >= 0
