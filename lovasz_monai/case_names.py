"""Case names from file paths, unique even where file names repeat in case folders.

The MSD layout names each case by its file (``imagesTr/liver_007.nii.gz``: ``liver_007``). Other
layouts keep one folder per case and repeat the file names (KiTS:
``case_00000/imaging.nii.gz``, ``case_00001/imaging.nii.gz``); there the folders name the
cases. The metrics tables, the prediction writer and the nnU-Net converter all name cases this
way. Plain ``os.path``; nothing here reads a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = ["case_id", "nifti_stem", "repeated_names_root", "unique_case_names"]

_COMPRESSIONS = (".gz", ".bz2", ".xz")


def case_id(source: str | os.PathLike) -> str:
    """Case id of an image file: its name without folder and extension (``.nii.gz`` counts as
    one extension).

    Example:
        >>> case_id("/data/imagesTr/liver_007.nii.gz"), case_id("scan.v2.mha")
        ('liver_007', 'scan.v2')
    """
    name = Path(source).name
    for compression in _COMPRESSIONS:
        name = name.removesuffix(compression)
    return Path(name).stem if "." in name.strip(".") else name


def nifti_stem(path: str | os.PathLike) -> str:
    """The file name without its NIfTI suffix (``.nii.gz`` or ``.nii``; other names unchanged).

    Example:
        >>> nifti_stem("a/ct_1.nii.gz"), nifti_stem("b.nii"), nifti_stem("c.png")
        ('ct_1', 'b', 'c.png')
    """
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def repeated_names_root(
    paths: Iterable[str | os.PathLike], stem: Callable[[str], str] = nifti_stem
) -> str | None:
    """``None`` when the files' base names (``stem``) all differ, else the deepest folder that
    holds them all: the folders below it tell files of one name apart (KiTS:
    ``case_00000/imaging.nii.gz``, ``case_00001/imaging.nii.gz``).

    Example:
        >>> repeated_names_root(["a/ct_1.nii.gz", "a/ct_2.nii.gz"]) is None
        True
        >>> root = repeated_names_root(["k/case_0/imaging.nii.gz", "k/case_1/imaging.nii.gz"])
        >>> os.path.relpath(root)
        'k'
    """
    paths = [os.fspath(p) for p in paths]
    stems = [stem(p) for p in paths]
    if len(set(stems)) == len(stems):
        return None
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def unique_case_names(
    paths: Sequence[str | os.PathLike],
    stem: Callable[[str], str] = case_id,
    what: str = "files",
    strict: bool = True,
) -> list[str]:
    """One name per path, in order, unique over the paths.

    The file name (``stem``) when those all differ (``labelsTr/case_000.nii.gz`` ->
    ``case_000``). When file names repeat in different folders (KiTS), the folders below the
    deepest folder common to all paths, joined with ``"_"`` (``case_00000``), if those are
    unique; else those folders and the file name (``a_b_seg``).

    Args:
        paths: the files, e.g. the images of the evaluated cases.
        stem: the file name without its extension (:func:`case_id`, or :func:`nifti_stem` where
            only NIfTI suffixes are to go).
        what: what the files are, for the error message.
        strict: refuse names that stay the same even with their folders; ``False``: keep them
            (only those repeat), for tables that list the paths beside the names.

    Returns:
        ``len(paths)`` names. They depend on the other paths: one KiTS case alone is named
        ``imaging``, two ``case_00000`` and ``case_00001``.

    Raises:
        ValueError: with ``strict``, two paths get the same name even with their folders
            (``x/seg.nii`` and ``x/seg.nii.gz``, or one file listed twice); the message names
            the colliding paths.

    Example:
        >>> unique_case_names(["labelsTr/case_0.nii.gz", "labelsTr/case_1.nii.gz"])
        ['case_0', 'case_1']
        >>> unique_case_names(["k/case_0/segmentation.nii.gz", "k/case_1/segmentation.nii.gz"])
        ['case_0', 'case_1']
        >>> unique_case_names(["k/a/seg.nii.gz", "k/a/ct.nii.gz", "k/b/seg.nii.gz"])
        ['a_seg', 'a_ct', 'b_seg']
    """
    paths = [os.fspath(p) for p in paths]
    stems = [stem(p) for p in paths]
    common = repeated_names_root(paths, stem)
    if common is None:
        return stems
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    parts = [Path(os.path.relpath(f, common)).parts if f != common else () for f in folders]
    by_folder = ["_".join(ps) for ps in parts]
    if all(by_folder) and len(set(by_folder)) == len(by_folder):
        return by_folder
    names = ["_".join((*ps, s)) for ps, s in zip(parts, stems, strict=True)]
    owners: dict[str, list[str]] = {}
    for name, path in zip(names, paths, strict=True):
        owners.setdefault(name, []).append(path)
    clashes = {n: ps for n, ps in owners.items() if len(ps) > 1}
    if clashes and strict:
        shown = "; ".join(f"'{n}': {', '.join(ps)}" for n, ps in list(clashes.items())[:5])
        raise ValueError(
            f"the {what} do not get unique case names, even with their folders ({shown})"
        )
    return names
