"""Checks made at open of a multi-file OME-TIFF set: one OME-XML naming several files (by
``FileName`` and ``UUID``) whose IFDs tifffile reads as the planes of one image.

tifffile finds a set's files by UUID and logs (not raises) what it cannot read, zeroing the
planes or leaving out an Image, so another is read in the slide's place. Refused here, naming
the files: a file named that is missing or unread, a set opened at a URL, an OME-XML that is in
a companion file, damaged or names its files at odds, and a file of another set under a name
the set gives. The planes' own structure is checked by :mod:`segpipe.io.readers.tiff_checks`
and :mod:`segpipe.io.readers.ome_planes`.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from typing import Any

from segpipe.io.ome import set_file_conflicts
from segpipe.io.readers.base import DECODE_ERRORS, ImageReadError

__all__ = [
    "check_ome_set",
    "check_ome_set_uuids",
    "files_named",
    "has_ome_xml",
    "local_name",
    "named_files",
    "other_set_files",
    "pixels_sizes",
]


def local_name(tag: str) -> str:
    """An XML element's tag without its namespace: ``{ns}Pixels`` is ``Pixels``."""
    return tag.rsplit("}", 1)[-1]


def pixels_sizes(root: ET.Element) -> list[tuple[str, str]]:
    """``(SizeY, SizeX)`` of each OME ``Pixels`` element under ``root``, as written."""
    pixels = (e for e in root.iter() if local_name(e.tag) == "Pixels")
    return [(e.get("SizeY", "").strip(), e.get("SizeX", "").strip()) for e in pixels]


def check_ome_set(tif: Any, path: str) -> None:
    """Refuse an OME-TIFF whose OME-XML places image planes in other files (a multi-file set)
    when tifffile read no page of one of them: it is missing, no TIFF, or lacks the IFDs
    named, or the set is opened at a URL (tifffile opens a set's other files by path only);
    and a file of a set whose OME-XML is in a companion file (BinaryOnly), is damaged (cut
    short or not well-formed) yet names other files, or gives a file two UUIDs or a UUID two
    files (:func:`set_file_conflicts`). A single file renamed since written
    (:func:`_is_renamed`) is no set.

    tifffile logs such a file and zeroes the planes named in it, or leaves out an Image whose
    planes were all there, and another Image is read in the slide's place. A file of another
    set found under a name the set gives is refused by :func:`check_ome_set_uuids`."""
    try:
        root = ET.fromstring(tif.ome_metadata) if tif.is_ome and tif.ome_metadata else None
    except ET.ParseError:
        root = None
    if root is None:  # no OME series: tifffile reads this file's pages alone
        if names := named_files(tif):
            damage = "not well-formed" if tif.is_ome else "cut short"
            raise ImageReadError(
                f"{path}: its OME-XML is damaged ({damage}) and names other files of an "
                f"OME-TIFF set ({', '.join(map(repr, names))}): only this file's own "
                "planes would be read, as an image of their own. Restore the OME-XML from a "
                "copy of the set as written, or open the set converted into one OME-TIFF"
            )
        return
    for e in root:
        if local_name(e.tag) == "BinaryOnly":
            xml = e.get("MetadataFile", "")
            raise ImageReadError(
                f"{path}: one file of an OME-TIFF set whose OME-XML is in {xml!r} "
                "(BinaryOnly), which tifffile does not read: only this file's planes would "
                "be read, as an image of their own. Convert the set into one OME-TIFF "
                f"(bfconvert {xml} out.ome.tif) and open that"
            )
    # FileName="" too: tifffile tries to open the folder, fails, and leaves out the Image
    uuids = [e for e in root.iter() if local_name(e.tag) == "UUID" and "FileName" in e.attrib]
    own = root.get("UUID")
    # tifffile finds a set's files by UUID (the first name given), Bio-Formats by name: files
    # renamed or an XML edited have one file's planes read as another's.
    pairs = [(e.get("FileName", ""), e.text) for e in uuids]
    folder = tif.filehandle.dirname
    if tif.filehandle.is_file and (odd := set_file_conflicts(folder, tif.filename, own, pairs)):
        raise ImageReadError(
            f"{path}: one file of an OME-TIFF set whose OME-XML gives a file two UUIDs or a "
            f"UUID two files ({'; '.join(odd)}): tifffile finds the files by UUID, Bio-Formats "
            "by name, and would read one file's planes as another's. Put the set's files "
            "together again under the names they were written with, or correct the OME-XML"
        )
    named = {
        name
        for e in uuids
        if e.text != own and (name := e.get("FileName", "")).lower() != tif.filename.lower()
    }
    if not named or _is_renamed(tif, root, uuids):
        return
    listed = ", ".join(map(repr, sorted(named)))
    if not tif.filehandle.is_file:
        raise ImageReadError(
            f"{path}: one file of an OME-TIFF set whose OME-XML places image planes in "
            f"{listed}, opened at a URL, where tifffile opens none of a set's other files; "
            "copy the set's files into one local folder and open this file there"
        )
    # UUIDs are one whatever their letter case, but tifffile compares them as written: this
    # file's own planes, named by its old name, would be looked for there and read as zeros.
    if (
        own
        and not any(os.path.exists(os.path.join(folder, name)) for name in named)
        and all((e.text or "").strip().lower() == own.strip().lower() for e in uuids)
    ):
        raise ImageReadError(
            f"{path}: its OME-XML places its planes in {listed} by this file's own UUID "
            f"written in other letter case ({own!r} and {uuids[0].text!r}), which tifffile "
            "takes for another file's: it would read zeros in their place. Write the UUIDs "
            "alike in the OME-XML (e.g. with tifffile's tiffcomment) and open it again"
        )
    read = {
        p.parent.filehandle.path: p.parent for s in tif.series for p in s.pages if p is not None
    }
    files = {name: os.path.realpath(os.path.join(folder, name)) for name in sorted(named)}
    problems = [
        f"{name!r} is not there"
        if not os.path.exists(file)
        else f"{name!r} was not read (no TIFF, or without the IFDs named)"
        for name, file in files.items()
        if file not in read
    ]
    if problems:
        raise ImageReadError(
            f"{path}: one file of an OME-TIFF set whose OME-XML places image planes in "
            f"{listed}, in {folder}; {'; '.join(problems)}. tifffile would read zeros or "
            "another image in their place: put the set's files together again in one "
            "folder, as they were written, and open this file there"
        )
    check_ome_set_uuids(root, {name: read[file] for name, file in files.items()}, path)


def has_ome_xml(tif: Any) -> bool:
    """Whether ``tif``'s first IFD holds OME-XML: tifffile's ``is_ome``, or a description
    that begins as OME-XML but is cut short (tifffile wants it to end in ``OME>``), whose
    images tifffile then lists as plain pages, channels as a stack."""
    try:
        text = (tif.pages.first.description or "").lstrip()
    except DECODE_ERRORS:  # a file cut short in its header (no IFD), which the caller reports
        return False
    return bool(tif.is_ome) or (text.startswith(("<?xml", "<OME")) and "<OME" in text[:4096])


def named_files(tif: Any) -> list[str]:
    """The other files that the OME-XML in ``tif``'s first IFD, parsed or not, names; none
    where the file has no first IFD to read."""
    try:
        text = tif.pages.first.description or ""
    except DECODE_ERRORS:  # a file cut short in its header (no IFD), which the caller reports
        return []
    return files_named(text, tif.filename)


def files_named(description: str, own: str) -> list[str]:
    """The file names an OME-XML ``description`` (parsed or not) gives besides ``own`` (the
    file's own name), sorted; none where it is no OME-XML.

    >>> files_named('<OME><UUID FileName="a.ome.tif"/><UUID FileName="b.ome.tif"/>', "a.ome.tif")
    ['b.ome.tif']
    """
    names = set(re.findall(r'FileName\s*=\s*"([^"]*)"', description)) - {own}
    return sorted(names) if "<OME" in description else []


def other_set_files(description: str, own: str) -> list[str]:
    """The other files of the multi-file OME-TIFF set whose OME-XML is ``description``, in a
    file named ``own``, sorted; none where it is no set's. A single-file OME-TIFF names
    itself (Bio-Formats writes its FileName and UUID), by its old name once renamed or
    copied: only an XML naming two files or more is a set's, and a name given the file's own
    UUID is the file itself.

    >>> a, b = '<UUID FileName="a.tif">u:1</UUID>', '<UUID FileName="b.tif">u:2</UUID>'
    >>> xml = f'<OME UUID="u:1">{a}{b}</OME>'
    >>> other_set_files(xml, "a.tif"), other_set_files(xml, "renamed.tif")
    (['b.tif'], ['b.tif'])
    >>> other_set_files(f'<OME UUID="u:1">{a}</OME>', "copy.tif")
    []
    """
    try:
        root = ET.fromstring(description)
    except (ET.ParseError, ValueError):
        return []
    if local_name(root.tag) != "OME":
        return []
    uuid = (root.get("UUID") or "").strip().lower()
    named = {
        (name, (e.text or "").strip().lower())
        for e in root.iter()
        if local_name(e.tag) == "UUID" and (name := e.get("FileName", ""))
    }
    if len({name for name, _ in named}) < 2:
        return []
    return sorted({n for n, u in named if n.lower() != own.lower() and not (uuid and u == uuid)})


def _is_renamed(tif: Any, root: ET.Element, uuids: list[ET.Element]) -> bool:
    """Whether an OME-TIFF whose planes (``uuids``: its TiffData's UUID elements) are all in
    one other file is a single-file OME-TIFF renamed: its OME-XML has no UUID of its own
    (optional), so names it by its old name alone; tifffile, finding no such file, reads its
    pages (a generic series). They are the image if the file holds every IFD named and its
    largest page is the largest Image's size; a placeholder in a set file is not."""
    # tifffile built an OME series from this file's planes (a TiffData without UUID): a set.
    if "UUID" in root.attrib or any(s.kind == "ome" for s in tif.series):
        return False
    tags = [(local_name(e.tag), e) for e in root.iter()]
    ifds = [e.get("IFD", "0") for t, e in tags if t == "TiffData"]
    sizes = pixels_sizes(root)
    declared = max(
        ((int(y), int(x)) for y, x in sizes if y.isdigit() and x.isdigit()),
        key=math.prod,
        default=None,
    )
    held = max(((s.keyframe.imagelength, s.keyframe.imagewidth) for s in tif.series), key=math.prod)
    return (
        len({(e.get("FileName"), e.text) for e in uuids}) == 1
        and all(i.isdigit() and int(i) < len(tif.pages) for i in ifds)
        and declared == held
    )


def check_ome_set_uuids(root: ET.Element, companions: dict[str, Any], path: str) -> None:
    """Refuse a file of a multi-file OME-TIFF set (``path``; ``root``, its OME-XML) another of
    whose files is not the one the set means: ``companions`` (the tifffile ``TiffFile`` read
    under each file name the set gives) holds a file of a set of its own (:func:`_set_uuid`)
    whose UUID is not the one the set's ``UUID`` elements give for that name: a file of another
    acquisition or export saved under the set's name. tifffile and Bio-Formats find the files
    by name alone and would read its planes as the set's. A file of no set of its own (one
    tifffile wrote, with a fresh UUID, as sets are put together by hand) is taken as the set's.
    Reads no pixel: tifffile read the files' IFDs."""
    owns = {name: _set_uuid(tif) for name, tif in companions.items()}
    wrong = {}
    for e in root.iter():
        name, named = e.get("FileName", ""), (e.text or "").strip()
        own = owns.get(name)
        if local_name(e.tag) == "UUID" and own and named and own.lower() != named.lower():
            file = companions[name].filehandle.path
            wrong[name] = f"it gives {name!r} as {named}, but {file} is {own}"
    if wrong:
        raise ImageReadError(
            f"{path}: one file of an OME-TIFF set whose OME-XML names its files by UUID; "
            f"{'; '.join(wrong.values())} (the UUID of that file's own OME-XML, which names "
            "a set of its own): a file of another acquisition or export saved under the "
            "set's name, whose planes would be read as the set's. Put the set's own files "
            "together again in one folder, as they were written, and open this file there"
        )


def _set_uuid(tif: Any) -> str | None:
    """The root ``UUID`` of ``tif``'s OME-XML (its first IFD's description, in memory since
    tifffile read the IFDs) where that XML is a set's: it names files by UUID or is
    ``BinaryOnly``, as Bio-Formats, OMERO and Micro-Manager write each file of a set. None
    otherwise: tifffile gives every ``.ome.tif`` it writes a fresh UUID of no meaning."""
    if not tif.is_ome:
        return None
    try:
        own = ET.fromstring(tif.pages.first.description)
    except ET.ParseError:
        return None
    in_a_set = any(
        local_name(e.tag) == "BinaryOnly" or (local_name(e.tag) == "UUID" and e.get("FileName"))
        for e in own.iter()
    )
    uuid = own.get("UUID")
    return uuid.strip() if in_a_set and uuid is not None else None
