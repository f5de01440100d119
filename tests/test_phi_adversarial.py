"""Hostile batches: every class of path by which PHI could reach Cloud Storage or BigQuery (issue 11).

Each class is tried in several variants, not only the one that was found:

- links: symbolic and hard links (relative, absolute, chained, from any folder) to an image under
  `PHI/` or flagged in lookup.json; a clean image reached under two names; `PHI` folders that are
  links, or hold links, to folders inside or outside the batch (and those whose held images
  cannot be known: the batch fails);
- names of files: `PHI` folders spelled with another case, below the top level, with blanks, or
  behind a backslash; on a gs:// landing zone, objects named `<batch>//PHI/x`, `<batch>/./PHI/x`...;
- lookup.json keys: `./`, another case, backslashes, blanks, `//`; keys that match no image or
  several, with and without a flag;
- lookup.json values: person names and identifiers by field name (plain, flattened `A.B.C`,
  indexed, snake case, tag numbers, nested objects) and by shape (`^`), and lookup values that
  try to fill a typed column;
- the audit itself: it must find a planted value wherever the gate might not look (private
  elements, nested sequences, after the pixel data, the second copy of a duplicated element,
  lookup.json values, JSON columns read back as text).

Most tests run the domain code the DAG runs (tests.test_bad_input.run_batch: plan -> staged plan
JSON -> archives -> rows -> report, with the landing zone snapshot and the PHI audit of every
output); the gs:// variants run against the Cloud Storage emulator, and one batch of each class
goes through the whole DAG (dag.test()) against both emulators.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_archive.archive import ArchiveIntegrityError, write_study_archive
from dicom_archive.deid_gate import DeidPolicy, Reason
from dicom_archive.landing import (
    GCSLandingZone,
    LandingZone,
    LocalLandingZone,
    is_under_phi_folder,
    normalise_relpath,
)
from dicom_archive.manifest import (
    NAME_SHAPED_KEY,
    NOT_A_FIELD_NAME,
    ManifestError,
    check_lookup_entry,
    field_keyword,
    is_keyword_path,
    match_lookup,
    unaccepted_field_rule,
)
from dicom_archive.naming import archive_object_name
from dicom_archive.plan import BatchPlan, plan_batch
from dicom_archive.rows import RunContext
from dicom_archive.settings import DEFAULT_HEADER_ALLOW_LIST, ArchiveSettings
from dicom_archive.stores import LocalObjectStore
from tests.archiving import archive_groups
from tests.conftest import PROJECT, pipeline_settings, run_dag
from tests.faultproxy import FaultProxy, ProxyRequest, ProxyResponse, Rule, proxied
from tests.test_bad_input import (
    BAD,
    BATCH,
    COLLECTION,
    DATE,
    ENTITY,
    ITEM,
    OTHER,
    PLANTED,
    Landing,
    Outcome,
    assert_no_leak,
    bad_image,
    good_images,
    run_batch,
    run_broken_batch,
    run_flagged,
    snapshot,
)
from tests.test_deid_gate import sequence_shaped
from tools import phi_audit
from tools.landing_zone import BatchSpec, ImageSpec, image_bytes, write_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NAME = PLANTED["PatientName"]  # Kowalczyk^Agnieszka
MRN = PLANTED["OtherPatientIDs"]  # MRN-7731904
BIRTH_DATE = "19650412"
PLAIN_NAME = "Agnieszka Kowalczyk"  # a name without `^`: caught only by its field's name


@pytest.fixture
def landing(tmp_path: Path) -> Landing:
    return Landing(tmp_path)


# =============================================================================================
# Paths and their normalisation (unit level: the rule, then the batches below)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("PHI/x.dcm", "PHI/x.dcm"),
        ("PHI//x.dcm", "PHI/x.dcm"),
        ("/PHI/x.dcm", "PHI/x.dcm"),
        ("./PHI/x.dcm", "PHI/x.dcm"),
        ("PHI/./x.dcm", "PHI/x.dcm"),
        ("PHI \\x.dcm", "PHI/x.dcm"),
        (" PHI /x.dcm ", "PHI/x.dcm"),
        ("a\\b\\c.dcm", "a/b/c.dcm"),
        ("a/b/c.dcm\t", "a/b/c.dcm"),
    ],
)
def test_paths_are_normalised_one_way(raw, normal):
    assert normalise_relpath(raw) == normal


@pytest.mark.parametrize(
    "relpath",
    ["PHI/x.dcm", "phi/x.dcm", "Phi/x.dcm", "a/PHI/x.dcm", "a/b/phi/c/x", "PHI \\x", ".//PHI//x", " PHI/x",
     "\uff30\uff28\uff29/x.dcm", "a/\uff50hi/x.dcm", "\u2119HI/x.dcm"],
)  # fmt: skip
def test_a_phi_folder_counts_at_any_depth_and_in_any_case(relpath):
    assert is_under_phi_folder(relpath)


@pytest.mark.parametrize("relpath", ["PHI", "a/PHI", "phi", "a/b/Phi ", "./PHI"])
def test_a_file_named_phi_counts_too(relpath):
    # Not a folder, but nothing says what else it would be: held, never opened.
    assert is_under_phi_folder(relpath)


@pytest.mark.parametrize("relpath", ["PHIx/a.dcm", "a/PHI.dcm", "xPHI/a", "P H I/a", "PHI.dcm", "a/PHI_old"])
def test_a_name_that_only_contains_the_word_does_not(relpath):
    assert not is_under_phi_folder(relpath)


# =============================================================================================
# Links: an image is judged by what it is, not by the name it is reached under


def _link(link: Path, target: Path | str, *, hard: bool = False) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if hard:
        os.link(target, link)
    else:
        link.symlink_to(target)


PHI_IMAGE = "PHI/" + BAD


def run_hostile(
    landing: Landing,
    *,
    bad: list[ImageSpec] = (),
    lookup: dict | None = None,
    setup: Callable[[Path], dict[str, str]] | None = None,
    expect: dict[str, str] | None = None,
    planted: tuple[str, ...] = (),
    compare_reasons: bool = True,
) -> Outcome:
    """tests.test_bad_input.run_batch, for batches whose hostile names are made by `setup(folder)`:
    it returns the quarantine reason of each path it made, added to `expect`."""
    expected = dict(expect or {})

    def plant(folder: Path) -> None:
        if setup is not None:
            expected.update(setup(folder))

    class Expected(dict):
        """The expectation, known once the setup has run inside run_batch (compare_reasons=False:
        only the paths; the caller checks the reasons)."""

        def __eq__(self, other: object) -> bool:
            if not compare_reasons and isinstance(other, dict):
                expected.update((k, v) for k, v in other.items() if k in expected)
            return expected == other

        def __len__(self) -> int:
            return len(expected)

        def values(self):  # type: ignore[override]
            return expected.values()

    return run_batch(landing, bad=bad, lookup=lookup, expect=Expected(), setup=plant, planted=planted)


LINK_VARIANTS: dict[str, Callable[[Path], list[str]]] = {
    "symbolic-relative": lambda f: _links(f, ("incoming/l.dcm", Path("..", PHI_IMAGE))),
    "symbolic-absolute": lambda f: _links(f, ("incoming/l.dcm", f / PHI_IMAGE)),
    "symbolic-at-top": lambda f: _links(f, ("l.dcm", Path(PHI_IMAGE))),
    "symbolic-chain": lambda f: _links(
        f, ("a/first.dcm", Path("..", PHI_IMAGE)), ("incoming/l.dcm", Path("../a/first.dcm"))
    ),
    "symbolic-through-dots": lambda f: _links(f, ("incoming/l.dcm", Path("../incoming/..", PHI_IMAGE))),
    "symbolic-to-the-phi-folder": lambda f: _links(f, ("incoming/l.dcm", Path("../PHI/incoming/bad.dcm"))),
    "hard": lambda f: _links(f, ("incoming/l.dcm", f / PHI_IMAGE), hard=True),
    "hard-at-top": lambda f: _links(f, ("l.dcm", f / PHI_IMAGE), hard=True),
    "hard-deep-without-extension": lambda f: _links(f, ("x/y/z/l", f / PHI_IMAGE), hard=True),
    "hard-and-symbolic": lambda f: [
        *_links(f, ("h/l.dcm", f / PHI_IMAGE), hard=True),
        *_links(f, ("s/l.dcm", Path("../h/l.dcm"))),
    ],
}  # fmt: skip


def _links(folder: Path, *pairs: tuple[str, Path], hard: bool = False) -> list[str]:
    for relpath, target in pairs:
        link = folder / relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        if hard:
            os.link(target, link)
        else:
            link.symlink_to(target)
    return [relpath for relpath, _ in pairs]


@pytest.mark.parametrize("variant", sorted(LINK_VARIANTS))
def test_a_link_to_an_image_under_phi_is_quarantined_as_phi_folder(landing, variant):
    made: list[str] = []

    def setup(folder: Path) -> dict[str, str]:
        made.extend(LINK_VARIANTS[variant](folder))
        return dict.fromkeys(made, Reason.PHI_FOLDER)

    phi = bad_image(relpath=PHI_IMAGE, PatientName=NAME)
    outcome = run_hostile(landing, bad=[phi], setup=setup, expect={PHI_IMAGE: Reason.PHI_FOLDER}, planted=(NAME,))
    assert made
    for relpath in [PHI_IMAGE, *made]:
        assert not outcome.opened(relpath), f"{relpath} was read"
    details = {q.relpath: q.detail for q in outcome.plan.quarantined}
    for relpath in made:
        assert details[relpath] == "a link to an image under PHI/ or flagged in lookup.json"
    # Every name of the held image is listed in the report, none is an alias.
    assert {q["path"] for q in outcome.report["quarantined"]} == {PHI_IMAGE, *made}
    assert outcome.report["aliases"] == []


@pytest.mark.parametrize("hard", [False, True], ids=["symbolic", "hard"])
@pytest.mark.parametrize("flag_key", [BAD, "./" + BAD, BAD.upper()], ids=["exact", "dot", "case"])
def test_a_link_to_an_image_flagged_in_lookup_json_is_quarantined_as_phi_folder(landing, hard, flag_key):
    flagged = bad_image(OperatorsName=PLANTED["OperatorsName"])

    def setup(folder: Path) -> dict[str, str]:
        target = folder / BAD if hard else Path("..", BAD)
        return dict.fromkeys(_links(folder, ("other/copy.dcm", target), hard=hard), Reason.PHI_FOLDER)

    outcome = run_hostile(
        landing,
        bad=[flagged],
        lookup={flag_key: {"flagged": True}},
        setup=setup,
        expect={BAD: Reason.FLAGGED_IN_LOOKUP},
        planted=(PLANTED["OperatorsName"],),
    )
    assert not outcome.opened("other/copy.dcm")
    assert not outcome.opened(BAD)


@pytest.mark.parametrize("hard", [False, True], ids=["symbolic", "hard"])
def test_a_clean_image_reached_under_two_names_counts_once(landing, hard):
    good = good_images()
    folder = landing.write(BatchSpec(BATCH, images=good, collection=COLLECTION))
    _links(folder, ("again/same.dcm", folder / good[0].path if hard else Path("..", good[0].path)), hard=hard)
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "DONE"
    assert outcome.reasons == {}
    assert outcome.plan.images_seen == len(good)
    # Counted under its first name in path order that is not a symbolic link.
    first, second = sorted([good[0].path, "again/same.dcm"]) if hard else (good[0].path, "again/same.dcm")
    assert outcome.planned == {image.path for image in good[1:]} | {first}
    assert sum(len(members) for members in outcome.archives.values()) == len(good)
    assert len(outcome.rows) == len(good)
    assert outcome.report["aliases"] == [{"path": second, "same_as": first}]
    assert not outcome.opened(second)


# =============================================================================================
# `PHI` folders reached through links: the folder itself, or a folder or file in it, is a link
# (to a folder inside the batch, or outside it), maybe chained; its images are held under every
# name, hard links from elsewhere in the batch included (audit "phi", defect 3)


def _held_image(path: Path) -> str:
    """A clean image (the pixels are the trouble, not the header): uploaded unless held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(bad_image()))
    return path.name


def _outside(folder: Path) -> Path:
    return folder.parents[1] / "outside"  # Landing.outside, next to the landing root


def _phi_tree(folder: Path, layout: dict[str, str | None], *hard: tuple[str, str]) -> None:
    """`layout`: a path (in the batch, or `@/...` outside it) -> a symbolic link's target, or None
    for a held image; `hard`: (link in the batch, image) pairs, the image named as in `layout`."""

    def where(name: str) -> Path:
        return _outside(folder) / name[2:] if name.startswith("@/") else folder / name

    for name, target in layout.items():
        if target is None:
            _held_image(where(name))
    for name, target in layout.items():
        if target is not None:
            _link(where(name), where(target) if target.startswith("@/") else target)
    for link, image in hard:
        _link(folder / link, where(image), hard=True)


# Each variant: the layout, the hard links, and the names that must be held (phi_folder).
PHI_TREE_VARIANTS: dict[str, tuple[dict[str, str | None], list[tuple[str, str]], list[str]]] = {
    "PHI-to-a-folder-inside": ({".held/p.dcm": None, "PHI": ".held"}, [], [".held/p.dcm", "PHI/p.dcm"]),
    "PHI-to-a-folder-outside-and-a-hard-link": (
        {"@/held/p.dcm": None, "PHI": "@/held"}, [("scan.dcm", "@/held/p.dcm")], ["PHI/p.dcm", "scan.dcm"]
    ),
    "PHI-to-a-folder-outside-relative-and-a-deep-hard-link": (
        {"@/held/p.dcm": None, "PHI": "../../outside/held"}, [("x/y/z", "@/held/p.dcm")], ["PHI/p.dcm", "x/y/z"]
    ),
    "phi-lower-case-to-a-folder-inside": ({"in/p.dcm": None, "phi": "in"}, [], ["in/p.dcm", "phi/p.dcm"]),
    "Phi-below-the-top-to-a-folder-inside": (
        {".held/p.dcm": None, "a/Phi": "../.held"}, [], [".held/p.dcm", "a/Phi/p.dcm"]
    ),
    "a-folder-link-in-PHI-to-a-folder-inside": (
        {"PHI/q.dcm": None, "elsewhere/p.dcm": None, "PHI/sub": "../elsewhere"},
        [],
        ["PHI/q.dcm", "PHI/sub/p.dcm", "elsewhere/p.dcm"],
    ),
    "a-folder-link-in-PHI-to-a-folder-outside-and-a-hard-link": (
        {"PHI/q.dcm": None, "@/held/p.dcm": None, "PHI/sub": "@/held"},
        [("incoming/scan.dcm", "@/held/p.dcm")],
        ["PHI/q.dcm", "PHI/sub/p.dcm", "incoming/scan.dcm"],
    ),
    "a-chain-of-folder-links-outside-and-a-hard-link": (
        {"@/held/p.dcm": None, "@/two": "@/held", "@/one": "@/two", "PHI": "@/one"},
        [("scan.dcm", "@/held/p.dcm")],
        ["PHI/p.dcm", "scan.dcm"],
    ),
    "a-folder-link-inside-a-linked-PHI-and-a-hard-link": (
        {"@/a/r.dcm": None, "@/held/p.dcm": None, "@/a/b": "@/held", "PHI": "@/a"},
        [("scan.dcm", "@/held/p.dcm")],
        ["PHI/r.dcm", "PHI/b/p.dcm", "scan.dcm"],
    ),
    "a-file-link-in-PHI-to-a-file-outside-and-a-hard-link": (
        {"@/held/p.dcm": None, "PHI/p.dcm": "@/held/p.dcm"}, [("scan.dcm", "@/held/p.dcm")], ["PHI/p.dcm", "scan.dcm"]
    ),
    "a-file-link-through-a-linked-PHI-inside": (
        {".held/p.dcm": None, "PHI": ".held", "incoming/l.dcm": "../PHI/p.dcm"},
        [],
        [".held/p.dcm", "PHI/p.dcm", "incoming/l.dcm"],
    ),
    "a-file-link-through-a-linked-PHI-outside": (
        {"@/held/p.dcm": None, "PHI": "@/held", "incoming/l.dcm": "../PHI/p.dcm"},
        [],
        ["PHI/p.dcm", "incoming/l.dcm"],
    ),
    "PHI-a-link-to-a-file": ({".held/p.dcm": None, "PHI": ".held/p.dcm"}, [], ["PHI", ".held/p.dcm"]),
    "PHI-a-link-to-a-file-outside-and-a-hard-link": (
        {"@/p.dcm": None, "PHI": "@/p.dcm"}, [("scan.dcm", "@/p.dcm")], ["PHI", "scan.dcm"]
    ),
    "PHI-a-regular-file-and-a-hard-link": ({"PHI": None}, [("scan.dcm", "PHI")], ["PHI", "scan.dcm"]),
    "phi-a-regular-file-below-the-top": ({"a/phi": None}, [], ["a/phi"]),
    "a-loop-in-PHI-walked-once": (
        {"PHI/p.dcm": None, "PHI/self": ".", "PHI/d/back": "..", "PHI/d/again": "../d"}, [], ["PHI/p.dcm"]
    ),
    "two-links-to-one-held-folder": (
        {".held/p.dcm": None, "PHI": ".held", "a/phi": "../.held"}, [], [".held/p.dcm", "PHI/p.dcm"]
    ),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(PHI_TREE_VARIANTS))
def test_an_image_held_through_a_linked_phi_folder_is_never_uploaded_under_any_name(landing, variant):
    layout, hard, held = PHI_TREE_VARIANTS[variant]

    def setup(folder: Path) -> dict[str, str]:
        _phi_tree(folder, layout, *hard)
        return dict.fromkeys(held, Reason.PHI_FOLDER)

    # run_batch checks: every held name quarantined as phi_folder (and nothing else), the counts
    # of the report (seen, archived, quarantined by reason), only the good images archived.
    outcome = run_hostile(landing, setup=setup)
    for relpath in held:
        assert not outcome.opened(relpath), f"{relpath} was read"
    assert outcome.report["images"]["quarantined_by_reason"] == {Reason.PHI_FOLDER: len(held)}
    assert outcome.report["aliases"] == []


# Each: the layout, and the name the batch's error must start with.
UNKNOWABLE_PHI_TREES: dict[str, tuple[dict[str, str | None], str, str]] = {
    "PHI-dangling": ({"PHI": "no-such-folder"}, "PHI", "a dangling link"),
    "phi-below-the-top-dangling": ({"a/phi": "../gone"}, "a/phi", "a dangling link"),
    "PHI-a-chain-that-dangles": ({"@/one": "@/missing", "PHI": "@/one"}, "PHI", "a dangling link"),
    "PHI-a-link-to-itself": ({"PHI": "PHI"}, "PHI", "a link that cannot be followed"),
    "PHI-a-loop-through-outside": ({"@/one": f"../landing/{BATCH}/PHI", "PHI": "@/one"}, "PHI", "cannot be followed"),
    "PHI-to-the-batch-folder": ({"PHI": "."}, "PHI", "a link to the batch folder"),
    "PHI-to-the-landing-root": ({"PHI": ".."}, "PHI", "a link to a folder that holds the batch folder"),
    "PHI-to-the-file-system-root": ({"PHI": "/"}, "PHI", "a link to a folder that holds the batch folder"),
    "a-folder-link-in-PHI-up-to-the-batch": ({"PHI/p.dcm": None, "PHI/d": ".."}, "PHI/d", "the batch folder"),
    "a-folder-link-in-PHI-dangling": ({"PHI/p.dcm": None, "PHI/d": "../gone"}, "PHI/d", "a dangling link"),
    "a-file-link-in-PHI-dangling": ({"PHI/p.dcm": None, "PHI/q.dcm": "@/gone.dcm"}, "PHI/q.dcm", "a dangling link"),
    "a-file-link-in-PHI-to-itself": ({"PHI/p.dcm": None, "PHI/q.dcm": "q.dcm"}, "PHI/q.dcm", "cannot be followed"),
    "a-loop-of-links-in-a-linked-PHI": (
        {"@/held/p.dcm": None, "@/held/a": "b", "@/held/b": "a", "PHI": "@/held"}, "PHI/a", "cannot be followed"
    ),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(UNKNOWABLE_PHI_TREES))
def test_a_phi_folder_whose_images_cannot_be_known_fails_the_batch(landing, variant):
    """Which images are held cannot be known: any of the batch's files could be one of them
    (a hard link). The batch fails, names the link, and uploads nothing; the neighbour goes on."""
    layout, source, rule = UNKNOWABLE_PHI_TREES[variant]
    outcome = run_broken_batch(
        landing,
        BatchSpec(BATCH, collection=COLLECTION),
        source=source,
        rule=rule,
        setup=lambda folder: _phi_tree(folder, layout),
    )
    assert "nothing of the batch is uploaded" in outcome.plan.error
    assert outcome.report["images"]["archived"] == 0


# =============================================================================================
# Names of files in a local landing zone


@pytest.mark.parametrize(
    "relpath",
    ["phi/" + BAD, "Phi/" + BAD, "incoming/PHI/bad.dcm", "a/b/phi/c/bad.dcm", "PHI /bad.dcm", "PHI\\bad.dcm",
     " PHI/bad.dcm"],
)  # fmt: skip
def test_an_image_in_a_phi_folder_of_any_spelling_is_never_read(landing, relpath):
    data = image_bytes(bad_image(PatientName=NAME))

    def setup(folder: Path) -> dict[str, str]:
        target = folder.joinpath(*relpath.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return {relpath: Reason.PHI_FOLDER}

    outcome = run_hostile(landing, setup=setup, planted=(NAME,))
    assert not outcome.opened(relpath)


# =============================================================================================
# lookup.json keys


@pytest.mark.parametrize(
    "key",
    ["./" + BAD, BAD.upper(), "Incoming/Bad.DCM", BAD.replace("/", "\\"), BAD + "  ", " " + BAD, BAD.replace("/", "//"),
     "./incoming/./bad.dcm", "/" + BAD],
)  # fmt: skip
def test_a_flag_under_any_spelling_of_the_key_holds_the_image(landing, key):
    lookup = {image.path: {"ScanOptions": "HELICAL"} for image in good_images()}
    lookup[key] = {"flagged": True}
    outcome = run_flagged(landing, lookup)
    assert outcome.report["lookup"]["keys_matching_no_image"] == []


@pytest.mark.parametrize("key", ["incoming/other.dcm", "bad.dcm", "incoming", "PHI/" + BAD, "batch.json"])
def test_a_flag_that_matches_no_image_fails_the_batch_and_uploads_nothing(landing, key):
    folder = landing.write(
        BatchSpec(BATCH, images=[*good_images(), bad_image()], collection=COLLECTION, lookup={key: {"flagged": True}})
    )
    before = snapshot(landing.root)
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "ERROR"
    assert outcome.plan.error.startswith(f"{folder / 'lookup.json'}: flagged entries that match no image")
    assert repr(key) in outcome.plan.error
    assert outcome.archives == {}
    assert outcome.rows == []
    assert outcome.report["status"] == "ERROR"
    assert {relpath for _, relpath in outcome.zone.opened} <= {"batch.json", "lookup.json"}
    after = snapshot(landing.root)
    assert set(after) - set(before) == {str(folder / "batch.report.json")}


def test_a_flag_that_matches_several_images_fails_the_batch(landing):
    images = [*good_images(), bad_image("a/x.dcm"), bad_image("A/X.dcm")]
    images[-1].instance_number = 2
    landing.write(BatchSpec(BATCH, images=images, collection=COLLECTION, lookup={"a/X.dcm": {"flagged": True}}))
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "ERROR"
    assert "'a/X.dcm'" in outcome.plan.error
    assert outcome.archives == {}


def test_keys_that_match_no_image_or_several_are_reported_and_applied_to_none(landing):
    images = [*good_images(), bad_image("a/x.dcm"), bad_image("A/X.dcm")]
    images[-1].instance_number = 2
    lookup = {"a/x.DCM": {"CTDIvol": 1.0}, "no/such.dcm": {"CTDIvol": 2.0}, "./" + images[0].path: {"CTDIvol": 3.0}}
    landing.write(BatchSpec(BATCH, images=images, collection=COLLECTION, lookup=lookup))
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "DONE"
    assert outcome.report["lookup"] == {
        "keys_matching_no_image": ["no/such.dcm"],
        "keys_matching_several_images": {"a/x.DCM": ["A/X.dcm", "a/x.dcm"]},
        "fields_withheld_from_rows": [],
    }
    by_path = {row["archive_member"]: row for row in outcome.rows}
    ctdi = [row["DicomHeader"].get("CTDIvol") for row in by_path.values()]
    assert ctdi.count(3.0) == 1
    assert 1.0 not in ctdi
    assert 2.0 not in ctdi


def test_several_keys_for_one_image_fail_the_batch(landing):
    """Decision (README): refused rather than merged, even when a flag would win the merge."""
    lookup = {BAD: {"ScanOptions": "HELICAL"}, "./" + BAD: {"flagged": False}, BAD.upper(): {"flagged": True}}
    landing.write(BatchSpec(BATCH, images=[*good_images(), bad_image()], collection=COLLECTION, lookup=lookup))
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "ERROR"
    assert "two image keys name the same path" in outcome.plan.error
    assert outcome.archives == {}
    assert {relpath for _, relpath in outcome.zone.opened} <= {"batch.json", "lookup.json"}


@pytest.mark.parametrize("flagged", [False, True])
def test_an_image_key_shaped_like_a_name_is_never_shown(landing, flagged):
    """Keys that match no image are listed in the report, and a flagged one in the error: never
    when shaped like a person's name."""
    keys = ["Kowalczyk^Agnieszka/x.dcm", "scans\\^Nowak/y.dcm"]
    lookup = {key: {"flagged": flagged} for key in keys}
    landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION, lookup=lookup))
    outcome = landing.process(BATCH)
    if flagged:
        assert outcome.plan.status == "ERROR"
        assert NAME_SHAPED_KEY in outcome.plan.error
    else:
        assert outcome.report["lookup"]["keys_matching_no_image"] == [NAME_SHAPED_KEY] * 2
    for text in ("Kowalczyk", "Nowak"):
        assert text not in json.dumps(outcome.report)
        assert text not in outcome.plan.to_json()


def test_match_lookup_rules():
    files = ["a.dcm", "b/c.dcm", "d.dcm", "D.dcm"]
    match = match_lookup({"./a.dcm": {"flagged": True}, "b\\c.dcm": {}, "z": {"flagged": True}, "d.DCM": {}}, files)
    assert match.entries == {"a.dcm": {"flagged": True}, "b/c.dcm": {}}
    assert match.unmatched == ["z"]
    assert match.ambiguous == {"d.DCM": ["D.dcm", "d.dcm"]}
    assert match.unsafe_flags({"z": {"flagged": True}, "d.DCM": {}}) == ["z"]
    with pytest.raises(ManifestError, match="two image keys name the same path"):
        match_lookup({"./a.dcm": {"flagged": True}, "A.DCM ": {"x": 1}}, files)


@pytest.mark.parametrize(
    ("entry", "passes"),
    [
        ({"PatientName": f"{ENTITY}^^^^"}, True),
        ({"PatientName": f"{ENTITY}={ENTITY}"}, True),
        ({"ReferringPhysicianName": "^"}, True),
        ({"RequestAttributesSequence": [{"ScheduledPerformingPhysicianName": "^^^^="}]}, True),
        ({"PatientName": f"{ENTITY}^JOHN"}, False),
        ({"PatientName": f"^{ENTITY}"}, False),
        ({"ReferringPhysicianName": "=Kowalczyk"}, False),
        ({"RequestAttributesSequence": [{"ScheduledPerformingPhysicianName": f"{ENTITY}^Nowak"}]}, False),
        ({"OtherPatientIDs": f"{ENTITY}^"}, False),
    ],
)
def test_a_lookup_name_that_is_the_coded_id_or_empty_but_for_its_delimiters_passes(entry, passes):
    """PS3.5 6.2: trailing empty name components and groups may be written with their delimiters."""
    violations = check_lookup_entry(entry, entity_id=ENTITY, item_id=ITEM).violations
    assert (violations == []) is passes


# Accented names: composed (NFC, as JSON is usually written) or decomposed (NFD, as macOS names files).
CAFE_NFC, CAFE_NFD = "incoming/caf\u00e9.dcm", "incoming/cafe\u0301.dcm"


@pytest.mark.parametrize(
    ("key", "relpath"), [(CAFE_NFC, CAFE_NFD), (CAFE_NFD, CAFE_NFC)], ids=["nfc-key-nfd-file", "nfd-key-nfc-file"]
)
def test_a_flag_whose_key_differs_from_the_file_name_only_in_unicode_composition_holds_the_image(landing, key, relpath):
    flagged = bad_image(relpath, OperatorsName=PLANTED["OperatorsName"])
    lookup = {key: {"flagged": True}, good_images()[0].path: {"CTDIvol": 1.0}}
    outcome = run_batch(
        landing,
        bad=[flagged],
        lookup=lookup,
        expect={relpath: Reason.FLAGGED_IN_LOOKUP},
        planted=(PLANTED["OperatorsName"],),
    )
    assert not outcome.opened(relpath)
    assert outcome.report["lookup"]["keys_matching_no_image"] == []


def test_a_key_differing_only_in_unicode_composition_reaches_its_image_s_row(landing):
    image = ImageSpec(ENTITY, ITEM, DATE, "CT", 3, 1, relpath=CAFE_NFD)
    landing.write(
        BatchSpec(BATCH, images=[*good_images(), image], collection=COLLECTION, lookup={CAFE_NFC: {"CTDIvol": 7.5}})
    )
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "DONE", outcome.plan.error
    assert [row["DicomHeader"].get("CTDIvol") for row in outcome.rows].count(7.5) == 1
    assert outcome.report["lookup"]["keys_matching_no_image"] == []


def test_two_files_that_differ_only_in_unicode_composition_make_a_flag_ambiguous(landing):
    images = [*good_images(), bad_image(CAFE_NFC), bad_image(CAFE_NFD)]
    images[-1].instance_number = 2
    landing.write(BatchSpec(BATCH, images=images, collection=COLLECTION, lookup={CAFE_NFC: {"flagged": True}}))
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "ERROR"
    assert "match no image, or several" in outcome.plan.error
    assert "Unicode composition" in outcome.plan.error
    assert outcome.archives == {}


@pytest.mark.parametrize("flagged", [True, False])
def test_two_keys_that_differ_only_in_unicode_composition_fail_the_batch(landing, flagged):
    lookup = {CAFE_NFC: {"flagged": flagged}, CAFE_NFD: {"CTDIvol": 1.0}}
    landing.write(BatchSpec(BATCH, images=[*good_images(), bad_image(CAFE_NFC)], collection=COLLECTION, lookup=lookup))
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "ERROR"
    assert "two image keys name the same path" in outcome.plan.error
    assert outcome.archives == {}


def test_a_key_in_compatibility_letters_names_another_file():
    """Decision: fullwidth letters or digits (NFKC would fold them) are another name, not the file's."""
    files = ["img/file.dcm", "img/2.dcm"]
    match = match_lookup({"img/\uff46\uff49\uff4c\uff45.dcm": {"flagged": True}, "img/\uff12.dcm": {}}, files)
    assert match.entries == {}
    assert match.unmatched == ["img/\uff12.dcm", "img/\uff46\uff49\uff4c\uff45.dcm"]
    assert match.unsafe_flags({"img/\uff46\uff49\uff4c\uff45.dcm": {"flagged": True}}) == [
        "img/\uff46\uff49\uff4c\uff45.dcm"
    ]


def test_unicode_composition_does_not_change_which_folder_is_phi():
    assert normalise_relpath("a/cafe\u0301/./x.dcm") == "a/caf\u00e9/x.dcm"
    assert not is_under_phi_folder("PHI\u0301/x.dcm")
    assert is_under_phi_folder("cafe\u0301/PHI/x.dcm")


# =============================================================================================
# lookup.json values


BAD_LOOKUP_VALUES = {
    "PatientName": NAME,
    "patient_name": NAME,
    "PATIENT NAME": NAME,
    "(0010,0010)": NAME,
    "00100010": NAME,
    "PatientID": MRN,
    "OtherPatientIDs": MRN,
    "AccessionNumber": "ACC-55193402",
    "PatientAddress": PLANTED["PatientAddress"],
    "RequestAttributesSequence.ScheduledPerformingPhysicianName": PLANTED["PerformingPhysicianName"],
    "RequestAttributesSequence[0].ScheduledPerformingPhysicianName": PLANTED["PerformingPhysicianName"],
    "ReferencedStudySequence.0.ReferringPhysicianName": PLANTED["ReferringPhysicianName"],
    "StudyDescription": f"CT CHEST {NAME}",
    "ClinicalNote": "seen by Haverford^Eleanor",
    "ProtocolName": ["HELICAL", NAME],
    "RequestAttributesSequence": {"RequestingPhysician": PLANTED["RequestingPhysician"]},
    # Other spellings of a person-name or identifier field, holding a value that is not name-shaped.
    "PatientsName": PLAIN_NAME,
    "patients_name": PLAIN_NAME,
    "0x00100010": PLAIN_NAME,
    "0010-0010": PLAIN_NAME,
    "(0x0010,0x0010)": PLAIN_NAME,
    "[0010 0010]": PLAIN_NAME,
    "Notes.0010.0010": PLAIN_NAME,
    "ReferringPhysician": PLAIN_NAME,
    "RequestAttributesSequence[0].(0040,0006)": PLAIN_NAME,
    "0010:0020": MRN,
    "OtherPatientIDsSequence[0].(0010,0020)": MRN,
    "PatientsBirthDate": BIRTH_DATE,
    # Plurals and possessives slipped, `Name` left out or added.
    "OtherPatientID": MRN,
    "PatientsID": MRN,
    "NameOfPhysicianReadingStudy": PLAIN_NAME,
    "PatientMothersBirthName": PLAIN_NAME,
    "Operator": PLAIN_NAME,
    "RequestingPhysicianName": PLAIN_NAME,
    # Not DICOM attributes, named for a person's name, contact or record number.
    "Name": PLAIN_NAME,
    "Surname": "Kowalczyk",
    "PatientFullName": PLAIN_NAME,
    "Notes.ReferringDoctor": PLAIN_NAME,
    "HomeAddress": PLANTED["PatientAddress"],
    "MRN": "7731904",
    "AccessionNo": "ACC-55193402",
    # Contact details and record locators that the header's default list now holds to no value too.
    "MedicalRecordLocator": "LOC-4471902",
    "PersonTelephoneNumbers": "555-0143-7781",
    "PatientTelecomInformation": "jane.marple@stmarymead.example",
    "ReferringPhysicianAddress": "221B Baker Street",
    "RequestAttributesSequence[0].PersonTelecomInformation": "jane.marple@stmarymead.example",
}


@pytest.mark.parametrize("field_name", sorted(BAD_LOOKUP_VALUES))
def test_a_lookup_value_that_breaks_a_header_rule_quarantines_its_image(landing, field_name):
    """Decision (README): the image is quarantined (identifying_attribute), not only the value
    dropped: an anonymizer that leaks into lookup.json is suspect for that image. The detail
    names the field, never the value."""
    value = BAD_LOOKUP_VALUES[field_name]
    image = bad_image()
    lookup = {img.path: {"ScanOptions": "HELICAL"} for img in good_images()}
    lookup[BAD] = {"CTDIvol": 12.1, field_name: value}
    planted = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v != "HELICAL"]
    if isinstance(value, dict):
        planted = list(value.values())
    outcome = run_batch(
        landing, bad=[image], lookup=lookup, expect={BAD: Reason.IDENTIFYING_ATTRIBUTE}, planted=tuple(planted)
    )
    (held,) = outcome.plan.quarantined
    assert held.detail.startswith("lookup.json: ")
    assert held.study == f"{ENTITY}_{DATE}_{ITEM}"
    for text in planted:
        assert phi_audit.normalize(text) not in phi_audit.normalize(held.detail)


def test_header_values_win_over_lookup_values_at_any_depth(landing):
    """Contract: lookup.json values are merged into the row, "header values read from the file win
    on conflict". A field whose attribute the file holds with another value (at the top, or at
    any item of a flattened sequence path) is left out of the row, whether or not the row's allow
    list carries the header's value; an equal value, or one the file does not hold, is merged."""
    header = {
        "StationName": "CT01",
        "ContrastBolusRoute": "IV",
        "ScanOptions": "AXIAL",
        "RequestAttributesSequence": [{"RequestedProcedureDescription": "MR KNEE"}],
    }
    image = ImageSpec(ENTITY, ITEM, DATE, "CT", 2, 1, relpath=BAD, header_overrides=header)
    entry = {
        "StationName": "CT99",
        "ContrastBolusRoute": "IV",  # equal: no conflict
        "ScanOptions": "HELICAL",
        "RequestAttributesSequence.RequestedProcedureDescription": "CT CHEST",
        "RequestAttributesSequence[0].RequestedProcedureDescription": "CT CHEST",
        "RequestAttributesSequence.0.ScheduledProcedureStepDescription": "ROUTINE",  # not in the file
        "CTDIvol": 12.1,
    }
    landing.write(BatchSpec(BATCH, images=[*good_images(), image], collection=COLLECTION, lookup={BAD: entry}))
    outcome = landing.process(BATCH)
    (row,) = [r for r in outcome.rows if r["DicomHeader"].get("CTDIvol") == 12.1]
    merged = row["DicomHeader"]
    assert merged["ScanOptions"] == "AXIAL", "an allow-listed header value wins"
    assert "StationName" not in merged, "the file holds another value, which the allow list leaves out"
    assert not any(key.endswith("RequestedProcedureDescription") for key in merged)
    assert merged["ContrastBolusRoute"] == "IV"
    assert merged["RequestAttributesSequence.0.ScheduledProcedureStepDescription"] == "ROUTINE"
    assert "CT99" not in json.dumps(outcome.rows)
    assert outcome.report["images"]["archived"] == len(good_images()) + 1


WITHHELD_LOOKUP_FIELDS = {
    "PatientBirthDate": BIRTH_DATE,  # deid's default recipe writes a coded one: the header may keep it
    "PatientBirthTime": "101500",
    "IssuerOfPatientID": "STARR",
    "RequestAttributesSequence": [{"IssuerOfPatientID": "STARR", "RequestedProcedureDescription": "CT CHEST"}],
    "OtherPatientIDsSequence": [{"IssuerOfPatientID": "STARR"}],
    # The same kinds under other keywords, and under a key of a field that is not a sequence (phi4).
    "PatientBirthDateInAlternativeCalendar": "5724-08-12",
    "RegionOfResidence": "St Mary Mead",
    "ReconstructionAlgorithm": {"PatientBirthDate": BIRTH_DATE},
    "FilterType": {"PatientName": "Jane Marple"},
    "ContrastBolusRoute": {"OtherPatientIDs": ["MRN 7731904"]},
    "ReconstructionMethod": {"PersonTelephoneNumbers": "555-0143-7781"},
}


@pytest.mark.parametrize("fields", [[f] for f in WITHHELD_LOOKUP_FIELDS] + [list(WITHHELD_LOOKUP_FIELDS)])
def test_an_identifying_lookup_value_the_header_rules_allow_is_kept_out_of_the_row(landing, fields):
    """A birth date, an issuer or a residence in lookup.json breaks none of the header's rules
    (deid's default recipe writes IssuerOfPatientID and PatientBirthDate into every image), nor does
    a contact attribute as a key under a field that is not a sequence: the image is archived, the
    field (the whole field at the top of its entry) is left out of its row, and the report names
    the field, never its value."""
    entry = {"CTDIvol": 12.1, "ScanOptions": "HELICAL", **{f: WITHHELD_LOOKUP_FIELDS[f] for f in fields}}
    first = good_images()[0].path
    planted = ("LOC-4471902", "555-0143-7781", BIRTH_DATE, "stmarymead", "Baker Street", "Jane Marple", "7731904")
    outcome = run_batch(landing, lookup={first: entry}, expect={}, planted=planted)
    (row,) = [r for r in outcome.rows if r["DicomHeader"].get("CTDIvol") == 12.1]  # the only entry
    assert "ScanOptions" in row["DicomHeader"], "the entry's other fields are merged"
    assert not set(fields) & set(row["DicomHeader"]), "a withheld field reached the row"
    assert "STARR" not in json.dumps(outcome.rows)
    assert outcome.report["lookup"]["fields_withheld_from_rows"] == [{"path": first, "fields": fields}]
    assert check_lookup_entry(entry, entity_id=ENTITY, item_id=ITEM).violations == []


@pytest.mark.parametrize(
    ("entry", "planted"),
    [
        ({"PatientName": {"Poirot": {"Hercule": True}}}, "Poirot"),
        ({"OtherPatientIDs": {"MRN7731904": True}}, "MRN7731904"),
        ({"PatientID": {"MRN7731904": False}}, "MRN7731904"),
        ({"ReferringPhysicianName": {"Poirot_Hercule": ""}}, "Poirot_Hercule"),
        ({"AccessionNumber": [{"ACC55193402": None}]}, "ACC55193402"),
        ({"RequestAttributesSequence": {"ScheduledPerformingPhysicianName": {"Marple": 1}}}, "Marple"),
    ],
)
def test_an_identifier_written_as_a_key_under_an_identifying_field_quarantines_its_image(landing, entry, planted):
    """The keys of an object under a field are values of that field: a name or a record number
    written as a key there is judged like one written as a value."""
    lookup = {img.path: {"ScanOptions": "HELICAL"} for img in good_images()}
    lookup[BAD] = {"CTDIvol": 12.1, **entry}
    outcome = run_batch(
        landing, bad=[bad_image()], lookup=lookup, expect={BAD: Reason.IDENTIFYING_ATTRIBUTE}, planted=(planted,)
    )
    (held,) = outcome.plan.quarantined
    assert planted not in held.detail


# Keys that are not plain field names (a name written as a key), at any depth; the value beside
# them may be harmless, empty, a flag-like boolean or itself a name.
BAD_LOOKUP_KEYS = {
    "name-as-key": ({"Kowalczyk^Agnieszka": "reviewed"}, "Kowalczyk^Agnieszka"),
    "nested-name-key-true": ({"Notes": {"Haverford^Eleanor": True}}, "Haverford^Eleanor"),
    "nested-name-key-null": ({"Notes": {"Haverford^Eleanor": None}}, "Haverford^Eleanor"),
    "nested-name-key-empty-object": ({"Notes": {"Haverford^Eleanor": {}}}, "Haverford^Eleanor"),
    "nested-name-key-name-value": ({"Notes": {"Brightwater^Tomas": NAME}}, "Brightwater^Tomas"),
    "comma-name": ({"Castellanos, Ines": 1}, "Castellanos, Ines"),
    "blank-name": ({"Ines Castellanos": "ok"}, "Ines Castellanos"),
    "equals": ({"Reviewer=Abernathy": "x"}, "Abernathy"),
    "non-ascii": ({"Notes": [{"Müller": 1}]}, "Müller"),
    "flattened-with-a-name-segment": ({"Comments.Okonkwo Chidi.Text": "ok"}, "Okonkwo Chidi"),
    "empty-key": ({"": "Lindqvist"}, "Lindqvist"),
    "in-a-list-item": ({"Items": [{"CTDIvol": 1}, {"Vasquez^Celine": 2}]}, "Vasquez^Celine"),
}


@pytest.mark.parametrize(("entry", "planted"), BAD_LOOKUP_KEYS.values(), ids=BAD_LOOKUP_KEYS.keys())
def test_a_lookup_key_that_is_not_a_field_name_quarantines_its_image(landing, entry, planted):
    """Like a bad value: the image is quarantined (identifying_attribute); the detail gives the
    field's position, never the key nor any path through it."""
    lookup = {img.path: {"ScanOptions": "HELICAL"} for img in good_images()}
    lookup[BAD] = {"CTDIvol": 12.1, **entry}
    outcome = run_batch(
        landing, bad=[bad_image()], lookup=lookup, expect={BAD: Reason.IDENTIFYING_ATTRIBUTE}, planted=(planted,)
    )
    (held,) = outcome.plan.quarantined
    assert held.detail == f"lookup.json: {unaccepted_field_rule('field 2')}"
    assert planted not in json.dumps(outcome.report, ensure_ascii=False)
    assert not any(planted in json.dumps(row, ensure_ascii=False) for row in outcome.rows)


@pytest.mark.parametrize(
    "entry",
    [
        {"PatientName": ENTITY},
        {"PatientID": ENTITY, "AccessionNumber": ITEM},
        {"OtherPatientNames": "", "OtherPatientIDs": ""},
        {"CTDIvol": 12.1, "ScanOptions": "HELICAL", "RequestAttributesSequence.RequestedProcedureDescription": "CT"},
        {"ConvolutionKernel": "2^10"},  # a caret with no letter beside it is no name
        {"ScanOptions": {"SliceThickness": 1.25, "Kernel": ["B30f", "B70f"]}},  # keys under a field: values
        {"flagged": False, "KVP": 120},
        {"CTExposureSequence[0].CTDIvol": 3.5, "CTExposureSequence.0.KVP": 120, "ImageType[1]": "PRIMARY"},
        {"CTExposureSequence": [{"CTDIvol": 3.5}, {"ExposureTime": 500}], "CurveLabel": "scout"},
        {"ScanNotes": "ok", "Scanner": {"name": "CT01"}},  # declared in DICOM_LOOKUP_FIELDS (policy)
    ],
)
def test_lookup_values_that_keep_the_rules_reach_dicomheader(landing, entry):
    target = good_images()[0].path
    policy = DeidPolicy(lookup_fields=("ScanNotes", "Scanner"))
    outcome = run_batch(landing, lookup={target: entry}, expect={}, policy=policy)
    (row,) = [row for row in outcome.rows if row["SOPInstanceUID"] == _sop_of(landing, target)]
    for key, value in entry.items():
        if key == "flagged":
            assert key not in row["DicomHeader"]
        elif key in DEFAULT_HEADER_ALLOW_LIST:
            assert key in row["DicomHeader"]  # the header's value wins on conflict
        else:
            assert row["DicomHeader"][key] == value


def _sop_of(landing: Landing, relpath: str) -> str:
    return str(pydicom.dcmread(landing.root / BATCH / relpath, stop_before_pixels=True).SOPInstanceUID)


def test_lookup_values_never_fill_typed_columns_and_stay_under_their_own_key(landing):
    good = good_images()
    no_description = ImageSpec(ENTITY, ITEM, DATE, "CT", 3, 1, relpath="x/plain.dcm",
                               header_overrides={"StudyDescription": None, "BodyPartExamined": None})  # fmt: skip
    lookup = {
        no_description.path: {
            "StudyDescription": "CT CHEST FROM LOOKUP",
            "BodyPartExamined": "LUNG",
            "Modality": "MR",
            "CTDIvol": 9.5,
            "PatientName": ENTITY,
        },
        good[0].path: {"StudyDescription": "OTHER WORDING", "ScanOptions": "HELICAL"},
    }
    spec = BatchSpec(BATCH, images=[*good, no_description], collection=COLLECTION, lookup=lookup)
    landing.write(spec)
    outcome = landing.process(BATCH)
    assert outcome.reasons == {}
    rows = {row["SOPInstanceUID"]: row for row in outcome.rows}
    plain = next(r for r in rows.values() if r["SeriesNumber"] == 3)
    assert plain["StudyDescription"] is None, "a lookup value filled a typed column"
    assert plain["BodyPartExamined"] is None
    assert plain["Modality"] == "CT"
    assert plain["DicomHeader"]["StudyDescription"] == "CT CHEST FROM LOOKUP"
    assert plain["DicomHeader"]["BodyPartExamined"] == "LUNG"
    assert plain["DicomHeader"]["Modality"] == "CT", "the header wins on conflict"
    assert plain["DicomHeader"]["CTDIvol"] == 9.5
    first = next(r for r in rows.values() if (r["entity_id"], r["SeriesNumber"], r["InstanceNumber"]) == (ENTITY, 1, 1))
    assert first["StudyDescription"] == "CT CHEST W CONTRAST"
    assert first["DicomHeader"]["StudyDescription"] == "CT CHEST W CONTRAST"


@pytest.mark.parametrize(
    ("name", "keyword"),
    [
        ("PatientName", "PatientName"),
        ("patient_name", "PatientName"),
        ("Patient Name", "PatientName"),
        ("A.B.ReferringPhysicianName", "ReferringPhysicianName"),
        ("Seq[0].Inner[12].OperatorsName", "OperatorsName"),
        ("(0008,0090)", "ReferringPhysicianName"),
        ("00080090", "ReferringPhysicianName"),
        ("CTDIvol", "CTDIvol"),
        ("no such field", None),
        ("PatientsName", "PatientName"),
        ("Patient's Name", "PatientName"),
        ("PATIENTS_NAME", "PatientName"),
        ("ReferringPhysiciansName", "ReferringPhysicianName"),
        ("ReferringPhysician", "ReferringPhysicianName"),
        ("Seq.OperatorsName", "OperatorsName"),
        ("0x00100010", "PatientName"),
        ("0X00100010", "PatientName"),
        ("0010-0010", "PatientName"),
        ("0010 0010", "PatientName"),
        ("0010_0010", "PatientName"),
        ("0010:0010", "PatientName"),
        ("(0x0010,0x0010)", "PatientName"),
        ("(0010, 0010)", "PatientName"),
        ("[0010,0010]", "PatientName"),
        ("[00100010]", "PatientName"),
        ("tag00100010", "PatientName"),
        ("A.0010.0010", "PatientName"),
        ("A[0].(0040,0006)[1]", "ScheduledPerformingPhysicianName"),
        ("0010,0020", "PatientID"),
        ("PatientsBirthDate", "PatientBirthDate"),
        ("OtherPatientID", "OtherPatientIDs"),
        ("PatientsID", "PatientID"),
        ("NameOfPhysicianReadingStudy", "NameOfPhysiciansReadingStudy"),
        ("PatientMothersBirthName", "PatientMotherBirthName"),
        ("Operator", "OperatorsName"),
        ("RequestingPhysicianName", "RequestingPhysician"),
        ("Rows", "Rows"),
        ("Notes", None),
    ],
)
def test_field_keyword(name, keyword):
    assert field_keyword(name) == keyword


@pytest.mark.parametrize(
    "name",
    [
        "PatientsName",
        "patients_name",
        "0x00100010",
        "0010-0010",
        "(0010, 0010)",
        "[0010,0010]",
        "0010 0010",
        "Seq.0010.0010",
    ],
)
def test_a_person_name_field_of_any_spelling_is_judged_by_its_keyword(name):
    """Another spelling of a keyword is not accepted (named by its position, whatever it holds);
    declared, the names that are plain identifiers stay judged by the keyword they spell."""
    for value in (PLAIN_NAME, ENTITY):
        assert check_lookup_entry({name: value}, entity_id=ENTITY, item_id=ITEM).violations == [
            unaccepted_field_rule("field 1")
        ]
    if name.isidentifier():
        declared = check_lookup_entry(
            {name: PLAIN_NAME}, entity_id=ENTITY, item_id=ITEM, declared_fields=[name]
        ).violations
        assert declared == [f"{name} (PatientName holds a person's name or identifier)"]


def test_a_violation_under_a_key_that_is_not_a_field_name_names_no_path():
    broken = check_lookup_entry(
        {"Notes": {"Bond^James": NAME, "CTDIvol": 1.0}, "PatientName": NAME, "ScanOptions": {"Doe, John": True}},
        entity_id=ENTITY,
        item_id=ITEM,
    ).violations
    assert broken == [
        unaccepted_field_rule("field 1"),
        "PatientName (PatientName holds a person's name or identifier)",
        f"ScanOptions ({NOT_A_FIELD_NAME})",
    ]


def test_lookup_violations_name_fields_never_values():
    broken = check_lookup_entry(
        {"PatientName": NAME, "StudyDescription": f"CT {NAME}", "CTDIvol": 1.0, "PatientID": ENTITY, "flagged": False},
        entity_id=ENTITY,
        item_id=ITEM,
    ).violations
    assert [b.split(" ", 1)[0] for b in broken] == ["PatientName", "StudyDescription"]
    assert not any("Kowalczyk" in b for b in broken)


# lookup.json fields are an allow list: a DICOM keyword, a flattened sequence path of keywords, or a
# name the site declares (DICOM_LOOKUP_FIELDS). Anything else quarantines its image, and is named
# by its position only: a deny-list cannot tell a name or a record number from a field name.
UNACCEPTED_LOOKUP_FIELDS = {
    # Names and record numbers written as keys (phi2 #4), with and without `_`, camelCase, digits.
    "name-key": {"Gregory_House": True},
    "camel-name-key": {"JaneMarple": "yes"},
    "lower-name-key": {"hercule_poirot": None},
    "record-number-key": {"MRN_7731904": True},
    "digits-key": {"7731904": True},
    "letter-and-digits-key": {"A7731904": {}},
    "name-key-under-object": {"reviewed_by": {"DOE_JOHN": "yes"}},
    "name-key-over-a-name": {"Notes": {"Hercule_Poirot": "Doe^Jane"}},
    # Person fields with a prefix or suffix, or named for a person without being a keyword (phi2 #5).
    "suffix-digit": {"OperatorsName2": "Hercule Poirot"},
    "suffix-old": {"OperatorsName_old": "Hercule Poirot"},
    "suffix-orig": {"VerifyingObserverName_orig": "Hercule Poirot"},
    "suffix-index-word": {"ResponsiblePerson_1": "Hercule Poirot"},
    "suffix-prev": {"PatientBirthName_prev": "Hercule Poirot"},
    "prefix": {"PrevPatientName": "Hercule Poirot"},
    "prefix-x-tag": {"x00100010": "Hercule Poirot"},
    "prefix-vr-tag": {"PN00100010": "Hercule Poirot"},
    "tag": {"(0010,0010)": "Hercule Poirot"},
    "bare-tag": {"00100010": "Hercule Poirot"},
    "role": {"Radiologist": "Hercule Poirot"},
    "reviewed-by": {"ReviewedBy": "Hercule Poirot"},
    "technologist": {"TechnologistName": "Hercule Poirot"},
    # Keywords in another case or with a look-alike letter: no guessing.
    "lower-case-keyword": {"patientname": "Hercule Poirot"},
    "upper-case-keyword": {"PATIENTNAME": "Hercule Poirot"},
    "cyrillic-a": {"P\u0430tientName": "Hercule Poirot"},
    "zero-width-space": {"PatientName\u200b": "Hercule Poirot"},
    "fullwidth": {"\uff30atientName": "Hercule Poirot"},
    "trailing-blank": {"PatientName ": "Hercule Poirot"},
    # Paths: a segment that is not a keyword, a keyword that is not a sequence, a long number.
    "path-name-segment": {"RequestAttributesSequence.Hercule_Poirot": "x"},
    "path-through-non-sequence": {"PatientName.Modality": "Hercule Poirot"},
    "path-record-number-item": {"RequestAttributesSequence.7731904.RequestedProcedureDescription": "CT"},
    "path-record-number-index": {"ImageType[7731904]": "PRIMARY"},
}
UNACCEPTED_NESTED = {
    "in-a-sequence-item": (
        {"RequestAttributesSequence": {"Gregory_House": True}},
        "field 1 of RequestAttributesSequence",
    ),
    "in-a-second-item": (
        {"RequestAttributesSequence": [{"RequestedProcedureDescription": "CT"}, {"MRN_7731904": True}]},
        "field 1 of RequestAttributesSequence[1]",
    ),
    "declared-name-nested": ({"CTExposureSequence": [{"TechnicalRemark": "ok"}]}, "field 1 of CTExposureSequence[0]"),
}


def _texts_of(entry: dict) -> list[str]:
    keys = [k for k in entry if k != "CTDIvol"]
    for value in entry.values():
        if isinstance(value, dict):
            keys += list(value)
        elif isinstance(value, list):
            keys += [k for item in value for k in item]
    return [k for k in keys if not is_keyword_path(k) and k != "TechnicalRemark"]  # the declared name is shown


def _assert_quarantined_unquoted(landing: Landing, entry: dict, where: str) -> Outcome:
    lookup = {img.path: {"ScanOptions": "HELICAL"} for img in good_images()}
    lookup[BAD] = {"CTDIvol": 12.1, **entry}
    policy = DeidPolicy(lookup_fields=("TechnicalRemark",))
    outcome = run_batch(
        landing, bad=[bad_image()], lookup=lookup, expect={BAD: Reason.IDENTIFYING_ATTRIBUTE}, policy=policy
    )
    (held,) = outcome.plan.quarantined
    assert held.detail == f"lookup.json: {unaccepted_field_rule(where)}"
    shown = json.dumps(outcome.report, ensure_ascii=False) + json.dumps(outcome.rows, ensure_ascii=False)
    for text in [*_texts_of(entry), "Hercule Poirot", "Doe^Jane", "7731904"]:
        assert text not in shown, text
    return outcome


@pytest.mark.parametrize("entry", UNACCEPTED_LOOKUP_FIELDS.values(), ids=UNACCEPTED_LOOKUP_FIELDS.keys())
def test_a_lookup_field_that_is_not_a_keyword_quarantines_its_image_unquoted(landing, entry):
    """phi2 #4-#6: the image is quarantined (identifying_attribute); the report names the image and
    the field's position, never the field; nothing of the entry reaches a row."""
    _assert_quarantined_unquoted(landing, entry, "field 2")


@pytest.mark.parametrize(("entry", "where"), UNACCEPTED_NESTED.values(), ids=UNACCEPTED_NESTED.keys())
def test_a_field_of_a_sequence_item_must_be_a_keyword_too(landing, entry, where):
    _assert_quarantined_unquoted(landing, entry, where)


@pytest.mark.parametrize(
    "name",
    [
        "CTDIvol",
        "PatientName",  # accepted as a field; its value is judged
        "CurveLabel",  # retired, repeating group
        "RequestAttributesSequence.RequestedProcedureDescription",
        "RequestAttributesSequence[0].ScheduledPerformingPhysicianName",
        "ReferencedStudySequence.0.ReferencedSOPInstanceUID",
        "ImageType[1]",
        "CTExposureSequence[0].CTDIvol",
    ],
)
def test_keyword_paths_are_accepted(name):
    assert is_keyword_path(name)


@pytest.mark.parametrize(
    "name",
    ["", "Notes", "patientname", "P\u0430tientName", "PatientName.Modality", "CTDIvol.0", "Seq[0].CTDIvol",
     "RequestAttributesSequence.", "RequestAttributesSequence.12345.RequestedProcedureDescription",
     "ImageType[12345]", "(0010,0010)", "0x00100010", "RequestAttributesSequence.0", "ImageType[\u0661]"],
)  # fmt: skip
def test_other_names_are_not_keyword_paths(name):
    assert not is_keyword_path(name)


def test_a_declared_field_is_accepted_at_the_top_and_its_values_still_judged():
    declared = ("ScanNotes", "Radiologist")  # DeidPolicy does not check names (Settings.load does)
    judged = check_lookup_entry(
        {"ScanNotes": {"remark": "Bond^James"}, "Radiologist": "Hercule Poirot", "Notes": "x"},
        entity_id=ENTITY,
        item_id=ITEM,
        declared_fields=declared,
    ).violations
    assert judged == [
        unaccepted_field_rule("field 3"),
        "Radiologist (Radiologist is named for a person's name, contact or record number and holds a value)",
        "ScanNotes (ScanNotes holds a value shaped like a person's name)",
    ]
    assert (
        check_lookup_entry(
            {"ScanNotes": "routine"}, entity_id=ENTITY, item_id=ITEM, declared_fields=declared
        ).violations
        == []
    )


def test_unknown_lookup_fields_through_the_dag_in_local_mode(airflow_db, tmp_path, monkeypatch):
    """End to end (dag.test(), SEND_TO_GOOGLE=false): an image whose lookup entry carries fields
    that are not keywords is quarantined, and no field name nor value of it is in any output or in
    the report; a declared field (DICOM_LOOKUP_FIELDS) reaches its row's DicomHeader."""
    root, output = tmp_path / "landing", tmp_path / "output"
    good = good_images()
    unknown = {"Gregory_House": True, "OperatorsName2": "Hercule Poirot", "x00100010": "Jane Marple"}
    lookup = {
        good[0].path: {"ScanRemark": "routine chest", "CTDIvol": 2.5},
        good[1].path: {"CTDIvol": 1.0, **unknown, "Notes": {"MRN_7731904": True}},
    }
    write_batch(root, BatchSpec(BATCH, images=good, collection=COLLECTION, lookup=lookup))
    for name, value in {
        "SEND_TO_GOOGLE": "false",
        "DICOM_LANDING_ROOT": str(root),
        "DICOM_LOCAL_OUTPUT": str(output),
        "DICOM_LOOKUP_FIELDS": "ScanRemark",
    }.items():
        monkeypatch.setenv(name, value)
    assert str(run_dag([BATCH]).state) == "success"

    report_text = (root / BATCH / "batch.report.local.json").read_text()
    report = json.loads(report_text)
    assert _failures(report) == {good[1].path: {Reason.IDENTIFYING_ATTRIBUTE}}
    (held,) = report["quarantined"]
    assert held["detail"] == "lookup.json: " + "; ".join(unaccepted_field_rule(f"field {n}") for n in (2, 3, 4, 5))
    assert report["deid_gate"]["lookup_fields"] == ["ScanRemark"]
    outputs = [report_text] + [
        p.read_text(errors="replace") for p in output.rglob("*") if p.is_file() and p.suffix != ".gz"
    ]
    for text in [*unknown, "Hercule Poirot", "Jane Marple", "Notes", "MRN_7731904", "7731904"]:
        assert not any(text in out for out in outputs), text
    rows = [json.loads(line) for p in output.rglob("*.ndjson") for line in p.read_text().splitlines()]
    assert len(rows) == len(good) - 1
    assert [row["DicomHeader"].get("ScanRemark") for row in rows].count("routine chest") == 1


# =============================================================================================
# Names of objects in a gs:// landing zone (Cloud Storage emulator)

GS_PHI_NAMES = [
    "/PHI/" + BAD,  # <batch>//PHI/...
    "./PHI/" + BAD,  # <batch>/./PHI/...
    "PHI//" + BAD,
    "PHI/./" + BAD,
    "PHI /" + BAD,
    "PHI\\" + BAD.replace("/", "\\"),
    "phi/" + BAD,
    "incoming/Phi/bad.dcm",
    ".//./PHI/" + BAD,
]


@pytest.fixture
def gcs_zone(bucket_name):
    """A gs:// landing zone with a prefix, read the production way (GCSLandingZone)."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    bucket = GCSHook().get_conn().bucket(bucket_name)
    return GCSLandingZone(bucket, "landing/zone")


def _upload_batch(zone: GCSLandingZone, spec: BatchSpec, extra: dict[str, bytes], tmp_path: Path) -> None:
    """write_batch into a local folder, then every file as an object (batch.json last), plus
    objects under names no file system can hold."""
    folder = write_batch(tmp_path / "staging", spec)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "batch.json")
    for path in files:
        zone.bucket.blob(f"{zone.prefix}{spec.batch_id}/{path.relative_to(folder).as_posix()}").upload_from_filename(
            str(path)
        )
    for name, data in extra.items():
        zone.bucket.blob(f"{zone.prefix}{spec.batch_id}/{name}").upload_from_string(data)
    zone.bucket.blob(f"{zone.prefix}{spec.batch_id}/batch.json").upload_from_filename(str(folder / "batch.json"))


def test_gs_objects_whose_names_hide_a_phi_folder_are_quarantined(gcs_zone, tmp_path):
    data = image_bytes(bad_image(PatientName=NAME))
    spec = BatchSpec(BATCH, images=good_images(), collection=COLLECTION)
    _upload_batch(gcs_zone, spec, dict.fromkeys(GS_PHI_NAMES, data), tmp_path)
    listed = {f.relpath for f in gcs_zone.list_files(BATCH)}
    assert set(GS_PHI_NAMES) <= listed, "the emulator keeps every name as given"

    plan = plan_batch(gcs_zone, BATCH)
    assert plan.status == "DONE", plan.error
    assert {q.relpath: q.reason for q in plan.quarantined} == dict.fromkeys(GS_PHI_NAMES, Reason.PHI_FOLDER)
    assert {image.relpath for group in plan.groups for image in group.images} == {i.path for i in good_images()}
    assert NAME.split("^")[0] not in plan.to_json()


def test_gs_objects_named_phi_are_held_like_local_files_of_that_name(gcs_zone, tmp_path):
    """A bucket has no links, but an object may be named `PHI` itself (no folder): held, as a
    local file of that name is, whatever its case or blanks; the good images still go through."""
    names = ["PHI", "scans/phi", "x/Phi ", "a\\PHI"]
    spec = BatchSpec(BATCH, images=good_images(), collection=COLLECTION)
    _upload_batch(gcs_zone, spec, dict.fromkeys(names, image_bytes(bad_image())), tmp_path)
    plan = plan_batch(gcs_zone, BATCH)
    assert plan.status == "DONE", plan.error
    assert {q.relpath: q.reason for q in plan.quarantined} == dict.fromkeys(names, Reason.PHI_FOLDER)
    assert plan.images_seen == len(good_images()) + len(names)
    assert {image.relpath for group in plan.groups for image in group.images} == {i.path for i in good_images()}


@pytest.mark.parametrize("key", ["./" + BAD, "//" + BAD, BAD.upper(), BAD.replace("/", "\\") + " "])
def test_gs_lookup_keys_are_matched_after_the_same_normalisation(gcs_zone, tmp_path, key):
    spec = BatchSpec(BATCH, images=[*good_images(), bad_image(OperatorsName=PLANTED["OperatorsName"])],
                     collection=COLLECTION, lookup={key: {"flagged": True}})  # fmt: skip
    _upload_batch(gcs_zone, spec, {}, tmp_path)
    plan = plan_batch(gcs_zone, BATCH)
    assert plan.status == "DONE", plan.error
    assert {q.relpath: q.reason for q in plan.quarantined} == {BAD: Reason.FLAGGED_IN_LOOKUP}


@pytest.mark.parametrize(
    ("key", "relpath"), [(CAFE_NFC, CAFE_NFD), (CAFE_NFD, CAFE_NFC)], ids=["nfc-key-nfd-object", "nfd-key-nfc-object"]
)
def test_gs_lookup_keys_are_matched_whatever_their_unicode_composition(gcs_zone, tmp_path, key, relpath):
    spec = BatchSpec(BATCH, images=[*good_images(), bad_image(relpath, OperatorsName=PLANTED["OperatorsName"])],
                     collection=COLLECTION, lookup={key: {"flagged": True}})  # fmt: skip
    _upload_batch(gcs_zone, spec, {}, tmp_path)
    plan = plan_batch(gcs_zone, BATCH)
    assert plan.status == "DONE", plan.error
    assert {q.relpath: q.reason for q in plan.quarantined} == {relpath: Reason.FLAGGED_IN_LOOKUP}


def test_gs_objects_that_differ_only_in_spelling_make_a_flag_ambiguous(gcs_zone, tmp_path):
    """`a.dcm` and `./a.dcm` are two objects with one normalised name: a flag for it fails the batch."""
    data = image_bytes(bad_image())
    spec = BatchSpec(BATCH, images=good_images(), collection=COLLECTION, lookup={BAD: {"flagged": True}})
    _upload_batch(gcs_zone, spec, {BAD: data, "./" + BAD: data}, tmp_path)
    plan = plan_batch(gcs_zone, BATCH)
    assert plan.status == "ERROR"
    assert "match no image, or several" in plan.error
    assert plan.lookup_ambiguous == {BAD: sorted(["./" + BAD, BAD])}


def _deflated(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_gs_deflated_images_are_judged_and_archived_inflated(gcs_zone, tmp_path):
    """Read from a bucket (reads pinned to the planned generation, the object read again from its
    start to inflate it): the clean deflated image archived as explicit little endian, the one
    with a name quarantined."""
    clean = _deflated(image_bytes(bad_image()))
    named = _deflated(image_bytes(bad_image(PatientName=NAME)))
    spec = BatchSpec(BATCH, images=good_images(), collection=COLLECTION)
    _upload_batch(gcs_zone, spec, {BAD: clean, "incoming/named.dcm": named}, tmp_path)
    plan = plan_batch(gcs_zone, BATCH)
    assert plan.status == "DONE", plan.error
    assert {q.relpath: q.reason for q in plan.quarantined} == {"incoming/named.dcm": Reason.IDENTIFYING_ATTRIBUTE}
    (study,) = [group for group in plan.groups if any(image.relpath == BAD for image in group.images)]
    buffer = io.BytesIO()
    _, members = write_study_archive(study, gcs_zone, buffer)
    (member,) = [m for m in members if m.relpath == BAD]
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue()), mode="r:gz") as tar:
        data = tar.extractfile(member.member_name).read()
    copy = pydicom.dcmread(io.BytesIO(data))
    assert copy.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert copy.PixelData == pydicom.dcmread(io.BytesIO(clean)).PixelData
    assert member.source_sha256 == hashlib.sha256(clean).hexdigest()
    assert NAME.split("^")[0].encode() not in buffer.getvalue()


# =============================================================================================
# Hostile headers, written byte by byte where pydicom would not write them


_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def explicit_element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element in Explicit VR Little Endian (the generator's transfer syntax)."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "UN") else b" "
    group, element = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def element_end(data: bytes, tag: int) -> int:
    """The offset just after the (first) top-level element `tag` of a Part 10 file."""
    stream = io.BytesIO(data)
    read_preamble(stream, force=True)
    _read_file_meta_info(stream)
    for element in data_element_generator(stream, False, True, defer_size=256):
        if int(element.tag) == tag:
            return element.value_tell + element.length
    raise KeyError(f"{tag:08X} is not in the file")


def with_copy(data: bytes, tag: int, vr: str, value: str) -> bytes:
    """A second copy of a top-level element right after the first: the parser keeps the last."""
    end = element_end(data, tag)
    return data[:end] + explicit_element(tag, vr, value.encode()) + data[end:]


def after_pixels(data: bytes, tag: int, vr: str, value: str) -> bytes:
    """An element appended after the pixel data (out of order: the gate must not stop reading)."""
    return data + explicit_element(tag, vr, value.encode())


PATIENT_NAME, PATIENT_ID, IDENTITY_REMOVED = 0x00100010, 0x00100020, 0x00120062


def hidden_name_archive(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A tar.gz whose DICOM members hide a value from a parsed view, one way each."""
    base = bad_image(PatientName=NAME)
    members = {
        "duplicate.dcm": with_copy(image_bytes(base), PATIENT_NAME, "PN", ENTITY),  # last copy is clean
        "after-pixels.dcm": after_pixels(image_bytes(bad_image()), PATIENT_NAME, "PN", "Lindqvist^Margareta"),
        "private-lo.dcm": after_pixels(
            with_copy(image_bytes(bad_image()), PATIENT_ID, "LO", ENTITY), 0x7FE10010, "LO", "Okonkwo^Chidi"
        ),
    }
    nested = bad_image(
        RequestAttributesSequence=[{"ScheduledPerformingPhysicianName": "Haverford^Eleanor"}],
    )
    members["nested.dcm"] = image_bytes(nested)
    private = bad_image()
    private.private_elements = (("ACME RECORDS 1.0", 0x0029, 0x10, "LO", "MRN-7731904"),)
    members["private.dcm"] = image_bytes(private)
    path = tmp_path / "out" / "study.tar.gz"
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"study/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected = {
        "duplicate.dcm": NAME,
        "after-pixels.dcm": "Lindqvist^Margareta",
        "private-lo.dcm": "Okonkwo^Chidi",
        "nested.dcm": "Haverford^Eleanor",
        "private.dcm": MRN,
    }
    return path, expected


def test_the_audit_finds_what_a_parsed_view_hides(tmp_path):
    path, expected = hidden_name_archive(tmp_path)
    auditor = phi_audit.Auditor(list(expected.values()))
    phi_audit.run(auditor, [path.parent])
    found = {f.field.split("!study/", 1)[1].split(":", 1)[0]: f for f in auditor.findings}
    assert set(found) == set(expected), [str(f) for f in auditor.findings]
    assert "raw element (0010,0010) (copy 1)" in found["duplicate.dcm"].field
    for finding in auditor.findings:
        assert "#" in finding.masked
        assert "Kowalczyk" not in str(finding)


def test_the_audit_collects_identifiers_hidden_in_raw_inputs(tmp_path):
    """Raw inputs: a duplicated PatientName's first copy, a private name, and lookup.json values."""
    raw = tmp_path / "raw"
    (raw / "b").mkdir(parents=True)
    (raw / "b" / "dup.dcm").write_bytes(with_copy(image_bytes(bad_image(PatientName=NAME)), PATIENT_NAME, "PN", ENTITY))
    implicit_private = bad_image()
    implicit_private.private_elements = (("ACME 1.0", 0x0029, 0x10, "LO", "Brightwater^Tomas"),)
    (raw / "b" / "private.dcm").write_bytes(image_bytes(implicit_private))
    (raw / "b" / "lookup.json").write_text(
        json.dumps(
            {
                BAD: {
                    "patient_name": "Castellanos^Ines",
                    "RequestAttributesSequence.OtherPatientIDs": "MRN-0042117",
                    "PatientBirthDate": BIRTH_DATE,
                    "Comment": "referred by Abernathy^Quentin",
                    "CTDIvol": 12.1,
                    "ScanOptions": "HELICAL",
                }
            }
        )
    )
    values = {phi_audit.normalize(i.value) for i in phi_audit.load_identifiers([raw])}
    for expected in (NAME, "Brightwater^Tomas", "Castellanos^Ines", "MRN-0042117", BIRTH_DATE, "Abernathy^Quentin"):
        assert phi_audit.normalize(expected) in values, expected
    assert "helical" not in values
    # The lookup.json alone, given as a file.
    alone = {i.value for i in phi_audit.load_identifiers([raw / "b" / "lookup.json"])}
    assert "Castellanos^Ines" in alone


def test_the_audit_reads_a_json_column_returned_as_text(tmp_path):
    name = "Ågren^Åsa"
    row = {"DicomHeader": json.dumps({"Comment": name}), "entity_id": ENTITY}
    out = tmp_path / "rows.ndjson"
    out.write_text(json.dumps(row) + "\n")  # the JSON text escapes Å: only a decoded view finds it
    assert "Ågren" not in out.read_text()
    findings = phi_audit.audit([name], [out])
    assert findings, "a name inside a JSON column read back as text was missed"


HEADER_VARIANTS: dict[str, tuple[Callable[[], bytes], set[str], tuple[str, ...]]] = {
    # name -> (the file's bytes, the reasons its quarantine entry must list, planted values)
    "nested-physician": (
        lambda: image_bytes(bad_image(RequestAttributesSequence=[{"ScheduledPerformingPhysicianName": NAME}])),
        {Reason.IDENTIFYING_ATTRIBUTE},
        (NAME,),
    ),
    "nested-twice": (
        lambda: image_bytes(
            bad_image(
                ReferencedStudySequence=[{"ReferencedSOPClassUID": "1.2.3", "ReferencedSOPInstanceUID": "1.2.3.4"}],
                RequestAttributesSequence=[
                    {"RequestedProcedureID": "RP1"},
                    {
                        "RequestedProcedureCodeSequence": [{"CodeMeaning": "CT", "CodeValue": "C1"}],
                        "ScheduledPerformingPhysicianName": PLANTED["PerformingPhysicianName"],
                    },
                ],
            )
        ),
        {Reason.IDENTIFYING_ATTRIBUTE},
        (PLANTED["PerformingPhysicianName"],),
    ),
    "nested-patient-id": (
        lambda: image_bytes(bad_image(OtherPatientIDsSequence=[{"PatientID": MRN}])),
        {Reason.IDENTIFYING_ATTRIBUTE},
        (MRN,),
    ),
    "nested-other-patient-name": (
        lambda: image_bytes(bad_image(RequestAttributesSequence=[{"PatientBirthName": "Lindqvist^Margareta"}])),
        {Reason.IDENTIFYING_ATTRIBUTE},
        ("Lindqvist^Margareta",),
    ),
    "burned-in-lower-case": (
        lambda: image_bytes(bad_image(BurnedInAnnotation="yes")),
        {Reason.BURNED_IN_ANNOTATION},
        (),
    ),
    "burned-in-multi-valued": (
        lambda: image_bytes(bad_image(BurnedInAnnotation=["NO", "YES"])),
        {Reason.BURNED_IN_ANNOTATION},
        (),
    ),
    "burned-in-padded": (lambda: image_bytes(bad_image(BurnedInAnnotation=" Yes")), {Reason.BURNED_IN_ANNOTATION}, ()),
    "identity-removed-lower-case": (
        lambda: image_bytes(bad_image(PatientIdentityRemoved="yes")),
        {Reason.IDENTITY_NOT_REMOVED},
        (),
    ),
    "identity-removed-no-then-yes": (
        lambda: with_copy(image_bytes(bad_image(PatientIdentityRemoved="NO")), IDENTITY_REMOVED, "CS", "YES"),
        {Reason.MALFORMED_HEADER},
        (),
    ),
    "patient-name-duplicated": (
        lambda: with_copy(image_bytes(bad_image(PatientName=NAME)), PATIENT_NAME, "PN", ENTITY),
        {Reason.MALFORMED_HEADER},
        (NAME,),
    ),
    "patient-name-after-pixels": (
        lambda: after_pixels(image_bytes(bad_image(PatientName=None)), PATIENT_NAME, "PN", NAME),
        {Reason.MALFORMED_HEADER},
        (NAME,),
    ),
}


def _with_private(image: ImageSpec, *elements: tuple) -> ImageSpec:
    image.private_elements = elements
    return image


@pytest.mark.parametrize("variant", sorted(HEADER_VARIANTS))
def test_a_header_that_hides_phi_is_quarantined_with_every_reason(landing, variant):
    make, reasons, planted = HEADER_VARIANTS[variant]
    data = make()

    def setup(folder: Path) -> dict[str, str]:
        target = folder / "incoming" / "hostile.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return {"incoming/hostile.dcm": min(reasons)}  # placeholder, compared below by the set of reasons

    outcome = run_hostile(landing, setup=setup, planted=planted, compare_reasons=False)
    (held,) = outcome.plan.quarantined
    assert held.relpath == "incoming/hostile.dcm"
    assert reasons <= {f["reason"] for f in held.all_failures()}, held.all_failures()
    for value in planted:
        assert phi_audit.normalize(value) not in phi_audit.normalize(held.detail)


@pytest.mark.parametrize("vr", ["LO", "SH", "UT", "UN", "OB", "PN"])
def test_private_elements_are_stripped_from_the_archived_copy(landing, vr):
    value = {"UN": MRN.encode(), "OB": MRN.encode(), "PN": NAME}.get(vr, MRN)
    image = _with_private(
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 3, relpath="incoming/private.dcm"),
        ("ACME RECORDS 1.0", 0x0029, 0x10, vr, value),
        ("ACME RECORDS 1.0", 0x0029, 0x11, "LO", "Brightwater Tomas"),
    )
    spec = BatchSpec(BATCH, images=[*good_images(), image], collection=COLLECTION)
    landing.write(spec)
    outcome = landing.process(BATCH)
    assert outcome.reasons == {}
    assert outcome.report["images"]["stripped"] == 1
    assert outcome.report["images"]["private_elements_removed"] >= 2
    (row,) = [r for r in outcome.rows if r["InstanceNumber"] == 3]
    assert row["private_elements_removed"] >= 2
    assert row["source_sha256"] != row["instance_sha256"]
    assert_no_leak(landing, outcome, [MRN, NAME, "Brightwater Tomas"])


@pytest.mark.parametrize("where", ["top", "nested"])
def test_private_elements_quarantine_the_image_when_so_configured(landing, where):
    from dicom_archive.deid_gate import DeidPolicy

    image = ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 3, relpath="incoming/private.dcm")
    if where == "top":
        image.private_elements = (("ACME RECORDS 1.0", 0x0029, 0x10, "LO", MRN),)
    else:
        image.header_overrides = {"RequestAttributesSequence": [{"RequestedProcedureID": "RP1"}]}
    data = bytearray(image_bytes(image))
    if where == "nested":
        # A private block inside the sequence item, written by hand: (0029,0010) creator + (0029,1010).
        ds = pydicom.dcmread(io.BytesIO(bytes(data)))
        item = ds.RequestAttributesSequence[0]
        item.private_block(0x0029, "ACME RECORDS 1.0", create=True).add_new(0x10, "LO", MRN)
        buffer = io.BytesIO()
        ds.save_as(buffer)
        data = bytearray(buffer.getvalue())
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    (folder / "incoming").mkdir()
    (folder / "incoming" / "private.dcm").write_bytes(bytes(data))
    outcome = landing.process(BATCH, policy=DeidPolicy(private_tags="quarantine"))
    assert outcome.reasons == {"incoming/private.dcm": Reason.PRIVATE_ATTRIBUTE}
    assert "(0029,1010, no known creator)" in outcome.plan.quarantined[0].detail
    assert_no_leak(landing, outcome, [MRN])


def test_private_elements_after_the_pixel_data_are_stripped_too(landing):
    data = image_bytes(ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 3))
    data = after_pixels(data, 0x7FE10010, "LO", "ACME RECORDS 1.0")
    data = after_pixels(data, 0x7FE11010, "LO", "Okonkwo^Chidi")
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    (folder / "tail.dcm").write_bytes(data)
    outcome = landing.process(BATCH)
    assert outcome.reasons == {}
    assert outcome.report["images"]["stripped"] == 1
    assert_no_leak(landing, outcome, ["Okonkwo^Chidi"])


# =============================================================================================
# One hostile batch of every class through the whole DAG (dag.test() against both emulators)

DAG_BUCKET = "adversarial-archive"
DAG_LANDING_BUCKET = "adversarial-landing"
DAG_COLLECTION = "IRB77310"
PREAMBLE_NAME = "Pemberton^Rosalind"
SEQUENCE_TEXT = b"Fairweather^Ottilie MRN-5512093"


def _hostile_files() -> tuple[dict[str, bytes], dict, dict[str, set[str]], list[str]]:
    """(files by path, lookup.json, expected reasons by path, planted values) of a batch that holds
    one item of each class that needs no link: lookup keys and values, hidden headers, private."""
    files = {image.path: image_bytes(image) for image in good_images()}
    private = _with_private(
        ImageSpec(ENTITY, ITEM, DATE, "CT", 4, 1), ("ACME RECORDS 1.0", 0x0029, 0x10, "LO", "Brightwater Tomas")
    )
    files["x/private.dcm"] = image_bytes(private)
    files["x/flagged.dcm"] = image_bytes(bad_image(OperatorsName=PLANTED["OperatorsName"]))
    files["x/lookup-leak.dcm"] = image_bytes(ImageSpec(ENTITY, ITEM, DATE, "CT", 4, 2))
    files["x/nested.dcm"] = image_bytes(
        bad_image(RequestAttributesSequence=[{"ScheduledPerformingPhysicianName": PLANTED["PerformingPhysicianName"]}])
    )
    files["x/duplicate.dcm"] = with_copy(image_bytes(bad_image(PatientName=NAME)), PATIENT_NAME, "PN", ENTITY)
    files["x/after-pixels.dcm"] = after_pixels(
        image_bytes(bad_image(PatientName=None)), PATIENT_NAME, "PN", "Lindqvist^Margareta"
    )
    lookup = {"./X/Flagged.dcm": {"flagged": True}, "x\\lookup-leak.dcm ": {"OtherPatientIDs": MRN, "CTDIvol": 3.0}}
    # Names as lookup keys, a person-name field spelled otherwise, a name-shaped key matching nothing.
    files["x/lookup-key.dcm"] = image_bytes(ImageSpec(ENTITY, ITEM, DATE, "CT", 4, 3))
    files["x/lookup-spelling.dcm"] = image_bytes(ImageSpec(ENTITY, ITEM, DATE, "CT", 4, 4))
    lookup["x/lookup-key.dcm"] = {"Kowalczyk^Agnieszka": "reviewed", "Notes": {"Nowak^Agnieszka": True}}
    lookup["x/lookup-spelling.dcm"] = {"PatientsName": "Chidi Okonkwo", "0x00080090": "Eleanor Haverford"}
    lookup["Castellanos^Ines/none.dcm"] = {"CTDIvol": 1.0}
    # A name encoded as a sequence (implicit VR; written UN), and one in the preamble of a clean image.
    files["x/name-as-sequence.dcm"] = sequence_shaped("PatientName", ImplicitVRLittleEndian, None, text=SEQUENCE_TEXT)
    files["x/name-as-un-sequence.dcm"] = sequence_shaped(
        "RequestAttributesSequence[0].ScheduledPerformingPhysicianName",
        ExplicitVRLittleEndian,
        "UN",
        text=SEQUENCE_TEXT,
    )
    preamble = ImageSpec(ENTITY, ITEM, DATE, "CT", 4, 5)
    files["x/preamble.dcm"] = f"PATIENT {PREAMBLE_NAME}".encode().ljust(128, b"\0") + image_bytes(preamble)[128:]
    expected = {
        "x/flagged.dcm": {Reason.FLAGGED_IN_LOOKUP},
        "x/lookup-leak.dcm": {Reason.IDENTIFYING_ATTRIBUTE},
        "x/lookup-key.dcm": {Reason.IDENTIFYING_ATTRIBUTE},
        "x/lookup-spelling.dcm": {Reason.IDENTIFYING_ATTRIBUTE},
        "x/nested.dcm": {Reason.IDENTIFYING_ATTRIBUTE},
        "x/duplicate.dcm": {Reason.MALFORMED_HEADER, Reason.IDENTIFYING_ATTRIBUTE},
        "x/after-pixels.dcm": {Reason.MALFORMED_HEADER, Reason.IDENTIFYING_ATTRIBUTE},
        "x/name-as-sequence.dcm": {Reason.MALFORMED_HEADER, Reason.IDENTIFYING_ATTRIBUTE},
        "x/name-as-un-sequence.dcm": {Reason.MALFORMED_HEADER, Reason.IDENTIFYING_ATTRIBUTE},
    }
    planted = [NAME, MRN, "Brightwater Tomas", "Lindqvist^Margareta", *PLANTED.values(), PREAMBLE_NAME]
    planted += [SEQUENCE_TEXT.decode()]
    planted += ["Nowak^Agnieszka", "Chidi Okonkwo", "Eleanor Haverford", "Castellanos^Ines"]
    return files, lookup, expected, planted


@pytest.fixture(scope="module")
def dag_env(gcs_emulator, bigquery_emulator, airflow_db):
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    for bucket in (DAG_BUCKET, DAG_LANDING_BUCKET):
        GCSHook().create_bucket(bucket_name=bucket, project_id=PROJECT)
    return {"bucket": DAG_BUCKET}


def _run_dag(landing_root: str, batch_id: str) -> str:
    settings = {"bucket": DAG_BUCKET, "collection": DAG_COLLECTION, "create_bucket": False}
    with pipeline_settings(landing_root, **settings):
        return str(run_dag([batch_id]).state)


def _dag_audit(planted: list[str], reports: str, collection: str | None = DAG_COLLECTION) -> list:
    """The PHI audit of the bucket, the reports and the collection's table (None: no table yet)."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    from hooks.dicom_storage import DicomStorageHook

    return phi_audit.audit(
        [v for v in planted if phi_audit.is_meaningful(v)],
        [f"gs://{DAG_BUCKET}"],
        reports=[reports],
        bigquery_tables=[f"{PROJECT}.{collection}.dicom"] if collection else [],
        bigquery_client=DicomStorageHook().bigquery_client(PROJECT),
        storage_client=GCSHook().get_conn(),
    )


def _failures(report: dict) -> dict[str, set[str]]:
    return {q["path"]: {f["reason"] for f in q["failures"]} for q in report["quarantined"]}


def test_a_hostile_local_batch_through_the_dag(dag_env, tmp_path):
    files, lookup, expected, planted = _hostile_files()
    root = tmp_path / "landing"
    batch_id = "20240105-hostile-local"
    folder = root / batch_id
    for relpath, data in {**files, PHI_IMAGE: image_bytes(bad_image(relpath=PHI_IMAGE, PatientName=NAME))}.items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_bytes(data)
    _links(folder, ("incoming/l.dcm", Path("..", PHI_IMAGE)))
    _links(folder, ("h/l.dcm", folder / PHI_IMAGE), hard=True)
    _links(folder, ("again/same.dcm", Path("..", good_images()[0].path)))
    # PHI folders reached through links: one outside the batch (with a hard link in it), one inside.
    linked_phi = {"@/held/p.dcm": None, "y/Phi": "@/held", ".held/q.dcm": None, "phi": ".held"}
    _phi_tree(folder, linked_phi, ("scan.dcm", "@/held/p.dcm"))
    (folder / "lookup.json").write_text(json.dumps(lookup))
    (folder / "batch.json").write_text(json.dumps(BatchSpec(batch_id, collection=DAG_COLLECTION).manifest()))

    state = _run_dag(str(root), batch_id)
    assert state == "success"
    report = json.loads((folder / "batch.report.json").read_text())
    assert _failures(report) == {
        **expected,
        PHI_IMAGE: {Reason.PHI_FOLDER},
        "incoming/l.dcm": {Reason.PHI_FOLDER},
        "h/l.dcm": {Reason.PHI_FOLDER},
        **{name: {Reason.PHI_FOLDER} for name in ["y/Phi/p.dcm", "scan.dcm", ".held/q.dcm", "phi/q.dcm"]},
    }
    assert report["aliases"] == [{"path": "again/same.dcm", "same_as": good_images()[0].path}]
    assert report["images"]["archived"] == len(good_images()) + 2  # the private one, stripped; the preamble's
    assert report["images"]["stripped"] == 1
    assert _dag_audit(planted, str(root)) == []


def test_a_hostile_gs_batch_through_the_dag(dag_env):
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    files, lookup, expected, planted = _hostile_files()
    phi = image_bytes(bad_image(PatientName=NAME))
    hidden = {"/PHI/" + BAD: phi, "./PHI/" + BAD: phi, "phi /a.dcm": phi, "y\\Phi\\b.dcm": phi}
    batch_id = "20240105-hostile-gs"
    bucket = GCSHook().get_conn().bucket(DAG_LANDING_BUCKET)
    prefix = f"zone/{batch_id}/"
    for name, data in {**files, **hidden}.items():
        bucket.blob(prefix + name).upload_from_string(data)
    bucket.blob(prefix + "lookup.json").upload_from_string(json.dumps(lookup))
    bucket.blob(prefix + "batch.json").upload_from_string(
        json.dumps(BatchSpec(batch_id, collection=DAG_COLLECTION).manifest())
    )

    state = _run_dag(f"gs://{DAG_LANDING_BUCKET}/zone", batch_id)
    assert state == "success"
    report = json.loads(bucket.blob(prefix + "batch.report.json").download_as_bytes())
    assert _failures(report) == {**expected, **{name: {Reason.PHI_FOLDER} for name in hidden}}
    assert report["images"]["archived"] == len(good_images()) + 2
    assert _dag_audit(planted, f"gs://{DAG_LANDING_BUCKET}/zone") == []


@pytest.mark.parametrize("mode", ["strip", "quarantine"])
@pytest.mark.parametrize("group", [0x0009, 0x0007])  # 0007 is not a private group by the standard: odd all the same
def test_a_private_creator_slot_holding_a_sequence_is_private_data(landing, mode, group):
    """(gggg,0010-00FF) reserves a block with a short text; holding a sequence it names no block
    but can carry anything (deid-data's ctbrain2 has such elements in group 0007)."""
    from pydicom.dataset import Dataset

    from dicom_archive.deid_gate import DeidPolicy

    ds = pydicom.dcmread(io.BytesIO(image_bytes(ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 3))))
    item = Dataset()
    item.add_new(0x00100010, "PN", NAME)
    item.add_new((group << 16) | 0x0011, "LO", MRN)
    ds.add_new((group << 16) | 0x0011, "SQ", [item])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    (folder / "slot.dcm").write_bytes(buffer.getvalue())
    outcome = landing.process(BATCH, policy=DeidPolicy(private_tags=mode))
    if mode == "strip":
        assert outcome.reasons == {}
        assert outcome.report["images"]["stripped"] == 1
    else:
        (held,) = outcome.plan.quarantined
        assert held.relpath == "slot.dcm"
        assert Reason.PRIVATE_ATTRIBUTE in {f["reason"] for f in held.all_failures()}
    assert_no_leak(landing, outcome, [NAME, MRN])


# =============================================================================================
# A planned image changed before the archive step (phi2 finding 7): only the very file the plan
# judged is read (its identity taken from the opened file), never one held back under PHI/

# The held copy: the planned image's header and size, other pixels (a burned-in annotation).
BURNED_IN = f"BURNED-IN:{NAME}".encode()
SWAPPED = good_images()[0].path  # an image of the CT study, three folders down
HELD = "PHI/held.dcm"


def _with_held_copy(folder: Path) -> Path:
    """Writes PHI/held.dcm: the image at SWAPPED with its last bytes (pixels) overwritten."""
    source = (folder / SWAPPED).read_bytes()
    (folder / "PHI").mkdir(exist_ok=True)
    (folder / HELD).write_bytes(source[: -len(BURNED_IN)] + BURNED_IN)
    return folder / HELD


def _swap_for_symlink(folder: Path) -> None:
    os.remove(folder / SWAPPED)
    os.symlink(folder / HELD, folder / SWAPPED)


def _swap_for_relative_symlink(folder: Path) -> None:
    os.remove(folder / SWAPPED)
    os.symlink(Path("../../..", HELD), folder / SWAPPED)


def _swap_for_hard_link(folder: Path) -> None:
    os.remove(folder / SWAPPED)
    os.link(folder / HELD, folder / SWAPPED)


def _rename_over(folder: Path) -> None:
    """Another file (new inode, same size and header) renamed over the planned name."""
    staged = folder / "staged.tmp"
    staged.write_bytes((folder / HELD).read_bytes())
    os.replace(staged, folder / SWAPPED)


def _rename_over_with_a_copy(folder: Path) -> None:
    """The same bytes in a new file: not the file the plan judged either (fail closed)."""
    staged = folder / "staged.tmp"
    staged.write_bytes((folder / SWAPPED).read_bytes())
    os.replace(staged, folder / SWAPPED)


def _rewrite_longer(folder: Path) -> None:
    with open(folder / SWAPPED, "ab") as image:
        image.write(BURNED_IN)


def _rewrite_in_place_keeping_size_and_time(folder: Path) -> None:
    """The held pixels written into the planned file itself, its mtime put back: only the
    change time (which no one can set back) shows it."""
    before = (folder / SWAPPED).stat()
    with open(folder / SWAPPED, "r+b") as image:
        image.write((folder / HELD).read_bytes())
    os.utime(folder / SWAPPED, ns=(before.st_atime_ns, before.st_mtime_ns))


def _delete(folder: Path) -> None:
    os.remove(folder / SWAPPED)


def _hard_link_into_phi(folder: Path) -> None:
    """The planned file itself is held back after planning (a second name under PHI/)."""
    os.link(folder / SWAPPED, folder / "PHI" / "also.dcm")


def _phi_folder_made_unknowable(folder: Path) -> None:
    """PHI/ gets a dangling link: what it holds back can no longer be known."""
    os.symlink(folder / "gone" / "x.dcm", folder / "PHI" / "dangling.dcm")


def _archive_swap_test(plan: BatchPlan, zone: LandingZone, out: Path) -> None:
    archive_groups(
        plan.groups,
        zone,
        LocalObjectStore(out),
        deid=plan.deid,
        context=RunContext("swap-test", "manual__swap"),
        settings=ArchiveSettings(),
    )


def _archive_after(landing: Landing, change: Callable[[Path], None]) -> ArchiveIntegrityError:
    """Plan the batch (PHI/held.dcm beside it), stage the plan as JSON, make the change, then
    run the archive step; returns its error, having checked that nothing of the image was kept."""
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    _with_held_copy(folder)
    zone = LocalLandingZone(landing.root)
    plan = BatchPlan.from_json(plan_batch(zone, BATCH).to_json())
    assert plan.status == "DONE"
    assert SWAPPED in {i.relpath for g in plan.groups for i in g.images}
    change(folder)
    landing.out.mkdir()  # audited below, even when nothing was written
    with pytest.raises(ArchiveIntegrityError) as caught:
        _archive_swap_test(plan, zone, landing.out)
    assert not (landing.out / archive_object_name(COLLECTION, ENTITY, DATE, ITEM)).exists()
    assert phi_audit.audit([NAME], [landing.out]) == []  # the held pixels are nowhere
    return caught.value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_swap_for_symlink, "now leads to an image held back under PHI/"),
        (_swap_for_relative_symlink, "now leads to an image held back under PHI/"),
        (_swap_for_hard_link, "now leads to an image held back under PHI/"),
        (_hard_link_into_phi, "now leads to an image held back under PHI/"),
        (_rename_over, r"is not the file that was planned \(changed after planning: .*st_ino"),
        (_rename_over_with_a_copy, r"is not the file that was planned \(changed after planning: .*st_ino"),
        (_rewrite_longer, r"is not the file that was planned \(changed after planning: .*size"),
        (
            _rewrite_in_place_keeping_size_and_time,
            r"is not the file that was planned \(changed after planning: ctime_ns\)",
        ),
        (_delete, r"no longer exists \(removed after planning\)"),
        (_phi_folder_made_unknowable, "a dangling link: what it holds back cannot be known"),
    ],
    ids=lambda value: getattr(value, "__name__", "").strip("_") or None,
)
def test_a_planned_image_changed_before_the_archive_step_is_never_uploaded(landing, change, message):
    error = _archive_after(landing, change)
    assert re.search(message, str(error)), str(error)
    # The error names the image, or the name under PHI/ that makes the held images unknowable.
    named = "PHI/dangling.dcm" if change is _phi_folder_made_unknowable else SWAPPED
    assert str(landing.root / BATCH / named) in str(error)
    assert "nothing of this archive is kept" in str(error)


def test_the_plan_records_the_identity_of_the_file_it_opened(landing):
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    plan = BatchPlan.from_json(plan_batch(LocalLandingZone(landing.root), BATCH).to_json())
    for image in (i for g in plan.groups for i in g.images):
        info = (folder / image.relpath).stat()
        assert image.source_identity == {
            "host": image.source_identity["host"],
            "st_dev": info.st_dev,
            "st_ino": info.st_ino,
            "size": info.st_size,
            "mtime_ns": info.st_mtime_ns,
            "ctime_ns": info.st_ctime_ns,
        }


def test_a_plan_made_on_another_machine_compares_size_and_modification_time(landing):
    """Device and inode numbers are each machine's own (an NFS or gcsfuse mount): a plan made on
    another worker is held to the file's size and modification time, and the held images are
    still known on this one."""
    from dicom_archive import landing as landing_module

    landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    zone = LocalLandingZone(landing.root)
    plan = plan_batch(zone, BATCH)
    for image in (i for g in plan.groups for i in g.images):  # what the other machine saw
        image.source_identity = {**image.source_identity, "host": 1, "st_dev": 7, "st_ino": 7, "ctime_ns": 7}
    _, rows = archive_groups(
        plan.groups, zone, LocalObjectStore(landing.root.parent / "out"), deid={},
        context=RunContext("other-host"), settings=ArchiveSettings(),
    )  # fmt: skip
    assert len(rows) == plan.images_accepted

    image = plan.groups[0].images[0]
    image.source_identity = {**image.source_identity, "mtime_ns": image.source_identity["mtime_ns"] + 1}
    with pytest.raises(ArchiveIntegrityError, match="changed after planning: mtime_ns"):
        archive_groups(
            plan.groups[:1], zone, LocalObjectStore(landing.root.parent / "out2"), deid={},
            context=RunContext("other-host"), settings=ArchiveSettings(),
        )  # fmt: skip
    assert landing_module._this_host() != 1


def test_a_plan_staged_without_file_identities_loads_and_archives_nothing(landing):
    """A plan staged by the previous version (no `source_identity`): it still loads, but which
    file it checked is unknown, so the archive step refuses its images (fail closed)."""
    landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    zone = LocalLandingZone(landing.root)
    doc = json.loads(plan_batch(zone, BATCH).to_json())
    for group in doc["groups"]:
        for image in group["images"]:
            del image["source_identity"]
    plan = BatchPlan.from_json(json.dumps(doc))
    assert all(image.source_identity == {} for g in plan.groups for image in g.images)
    with pytest.raises(ArchiveIntegrityError, match="the plan does not record which file it checked"):
        _archive_swap_test(plan, zone, landing.out)
    assert [p for p in landing.out.rglob("*") if p.is_file()] == []


def test_an_image_swapped_while_the_batch_is_planned_is_quarantined(landing):
    """A swap between the listing (which judged links and second names) and the header read:
    the opened file is not the listed one, and the image is held back."""
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    _with_held_copy(folder)

    class SwappingZone(LocalLandingZone):
        def list_files(self, batch_id):
            files = super().list_files(batch_id)
            _swap_for_hard_link(folder)
            return files

    plan = plan_batch(SwappingZone(landing.root), BATCH)
    assert plan.status == "DONE"
    held = {q.relpath: (q.reason, q.detail) for q in plan.quarantined}
    assert held[SWAPPED] == (Reason.UNREADABLE, "changed or replaced while the batch was being checked")
    assert SWAPPED not in {i.relpath for g in plan.groups for i in g.images}


def _generation_reads(proxy: FaultProxy) -> Rule:
    """What the emulator does not do: a media read that asks for `generation=N` answers 404 when N
    is not the object's generation (any more), as Cloud Storage does for a generation that no longer
    exists (no object versioning on a landing bucket); one with `ifGenerationMatch=N` answers 412."""

    def respond(request: ProxyRequest) -> ProxyResponse | None:
        match = re.fullmatch(r"/download/storage/v1/b/([^/]+)/o/(.+)", request.path)
        params = request.query_params()
        asked = {key: params[key][0] for key in ("generation", "ifGenerationMatch") if key in params}
        if match is None or not asked:
            return None
        current = proxy.upstream_request("GET", f"/storage/v1/b/{match[1]}/o/{match[2]}")
        generation = current.json()["generation"] if current.status == 200 else None
        if "generation" in asked and asked["generation"] != generation:
            return ProxyResponse.of_json(404, {"error": {"code": 404, "message": "No such object."}})
        if "ifGenerationMatch" in asked and asked["ifGenerationMatch"] != generation:
            return ProxyResponse.of_json(412, {"error": {"code": 412, "message": "conditionNotMet"}})
        return None

    return Rule(method="GET", path=r"^/download/", times=None, respond=respond)


def test_a_gs_object_written_again_after_planning_is_never_read(gcs_emulator, bucket_name, tmp_path):
    """In a bucket the plan records the generation it listed and read, and the archive step reads
    only that generation: an object written again (same name, size and header) is refused."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    with proxied(gcs_emulator.url, "STORAGE_EMULATOR_HOST") as proxy:
        rule = proxy.add(_generation_reads(proxy))
        zone = GCSLandingZone(GCSHook().get_conn().bucket(bucket_name), "landing/zone")
        _upload_batch(zone, BatchSpec(BATCH, images=good_images(), collection=COLLECTION), {}, tmp_path)
        plan = BatchPlan.from_json(plan_batch(zone, BATCH).to_json())
        listed = {b.name: b.generation for b in zone.bucket.list_blobs(prefix=f"{zone.prefix}{BATCH}/")}
        for image in (i for g in plan.groups for i in g.images):
            assert image.source_identity == {"generation": listed[f"{zone.prefix}{BATCH}/{image.relpath}"]}
        planned_reads = rule.seen
        assert planned_reads >= len(good_images())  # every header read asked for its generation
        blob = zone.bucket.blob(f"{zone.prefix}{BATCH}/{SWAPPED}")
        source = blob.download_as_bytes()
        blob.upload_from_string(source[: -len(BURNED_IN)] + BURNED_IN)  # same size, a new generation

        out = tmp_path / "out"
        with pytest.raises(ArchiveIntegrityError, match="no longer exists as planned") as caught:
            _archive_swap_test(plan, zone, out)
        assert rule.seen > planned_reads
        assert rule.fired >= 1
    assert f"{zone.prefix}{BATCH}/{SWAPPED}" in str(caught.value)
    assert not (out / archive_object_name(COLLECTION, ENTITY, DATE, ITEM)).exists()
    assert phi_audit.audit([NAME], [out]) == []


# Each its own archive prefix and table: the hostile batches' studies, and the other swap's, are the same.
SWAP_COLLECTIONS = {"symlink": "IRB77311", "hard-link": "IRB77312"}


def _archive_task_failure(run_id: str) -> tuple[str, int]:
    """The state and try number of the run's archive task (mapped: its first index)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = (
            session.query(TaskInstance)
            .filter(TaskInstance.run_id == run_id, TaskInstance.task_id == "archive_studies")
            .order_by(TaskInstance.map_index)
            .first()
        )
        return str(ti.state), ti.try_number


@pytest.mark.parametrize(
    ("swap", "collection"),
    [(_swap_for_symlink, SWAP_COLLECTIONS["symlink"]), (_swap_for_hard_link, SWAP_COLLECTIONS["hard-link"])],
    ids=list(SWAP_COLLECTIONS),
)
def test_a_planned_image_swapped_for_a_held_one_through_the_dag(
    dag_env, tmp_path, monkeypatch, capfd, swap, collection
):
    """phi2 finding 7 end to end: between the plan step and the archive step the planned image
    becomes the held one (same size and header, burned-in pixels). The archive task fails at
    once (not retried) naming the image; nothing of that study lands, no report is written, and
    the batch stays re-processable: the next run plans it as it now is (the name is held back)."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    from dicom_archive.batch import Staging

    monkeypatch.setenv("DICOM_TASK_RETRIES", "3")  # read when the DAG is parsed: must not be used
    root = tmp_path / "landing"
    batch_id = f"20240105-swap-{swap.__name__.strip('_').replace('_', '-')}"
    folder = write_batch(root, BatchSpec(batch_id, images=good_images(), collection=collection))
    _with_held_copy(folder)
    stage_plan = Staging.stage_plan

    def stage_then_swap(self, plan, studies_per_chunk):
        refs = stage_plan(self, plan, studies_per_chunk)
        swap(folder)  # the plan is staged: the anonymizer (or anyone) changes the batch now
        return refs

    monkeypatch.setattr(Staging, "stage_plan", stage_then_swap)
    settings = {"bucket": DAG_BUCKET, "collection": collection, "create_bucket": False}
    with pipeline_settings(str(root), **settings):
        run = run_dag([batch_id])
    assert str(run.state) == "failed"
    assert _archive_task_failure(run.run_id) == ("failed", 1)
    task_log = capfd.readouterr().out  # the task's log (dag.test() writes it to stdout)
    assert f"AirflowFailException: ArchiveIntegrityError: {folder / SWAPPED} now leads to an image held" in task_log
    assert not (folder / "batch.report.json").exists()  # re-processable, like any failed archive task
    storage = GCSHook().get_conn()
    ct_study = archive_object_name(collection, ENTITY, DATE, ITEM)
    assert storage.bucket(DAG_BUCKET).get_blob(ct_study) is None
    assert _dag_audit([NAME], str(root), collection=None) == []

    monkeypatch.setattr(Staging, "stage_plan", stage_plan)
    with pipeline_settings(str(root), **settings):
        assert str(run_dag([batch_id]).state) == "success"
    report = json.loads((folder / "batch.report.json").read_text())
    assert report["status"] == "DONE"
    assert _failures(report) == {SWAPPED: {Reason.PHI_FOLDER}, HELD: {Reason.PHI_FOLDER}}
    assert report["images"]["archived"] == len(good_images()) - 1
    assert _dag_audit([NAME], str(root), collection=collection) == []


def test_an_image_rewritten_while_the_archive_step_reads_it_is_not_kept(landing):
    """The identity is taken before the first byte is read; a rewrite in place after that (same
    size, the held pixels) is seen by taking it again once the file has been read."""
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    _with_held_copy(folder)

    class RewritingZone(LocalLandingZone):
        checked = 0

        def source_identity(self, stream):
            identity = super().source_identity(stream)
            if os.path.samefile(stream.name, folder / SWAPPED):
                self.checked += 1
                if self.checked == 1:  # the archive step's check, before its first read
                    _rewrite_in_place_keeping_size_and_time(folder)
            return identity

    plan = BatchPlan.from_json(plan_batch(LocalLandingZone(landing.root), BATCH).to_json())
    landing.out.mkdir()
    with pytest.raises(ArchiveIntegrityError, match="changed while it was archived") as caught:
        archive_groups(
            plan.groups,
            RewritingZone(landing.root),
            LocalObjectStore(landing.out),
            deid=plan.deid,
            context=RunContext("swap-test", "manual__swap"),
            settings=ArchiveSettings(),
        )
    assert str(folder / SWAPPED) in str(caught.value)
    assert not (landing.out / archive_object_name(COLLECTION, ENTITY, DATE, ITEM)).exists()
    assert phi_audit.audit([NAME], [landing.out]) == []


# --------------------------------------------------------------- file names shaped like a person's name


def test_file_names_shaped_like_a_name_never_reach_the_report(landing):
    """File names are the anonymizer's; one shaped like a person's name (a letter next to `^`) is
    not shown where the report names images: quarantined paths, second names, the images an
    ambiguous lookup key matches, and the messages of the PHI-folder walk."""
    names = {
        "held": "PHI/Doe^John_MRN7731904.dcm",
        "bad": "scans/Smith^Jane/bad.dcm",
        "first": "Poirot^Hercule.dcm",
    }
    images = [
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 1, relpath=names["first"]),
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 2),
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 3, relpath=names["held"]),
        ImageSpec(ENTITY, ITEM, DATE, "CT", 1, 4, relpath=names["bad"], header_overrides={"OperatorsName": "X^Y"}),
        ImageSpec(*OTHER, "MR", 1, 1, relpath="a/MARPLE^JANE.dcm"),
        ImageSpec(*OTHER, "MR", 1, 2, relpath="a/marple^jane .dcm"),
    ]
    lookup = {"a/Marple^Jane.dcm": {"Modality": "MR"}}  # matches both after normalising: ambiguous
    folder = landing.write(BatchSpec(BATCH, images=images, collection=COLLECTION, lookup=lookup))
    os.link(folder / names["first"], folder / "Wolfe^Nero.dcm")  # a second name of an image
    outcome = landing.process(BATCH)
    text = json.dumps(outcome.report)
    for word in ("Doe", "John", "Smith", "Jane", "Poirot", "Hercule", "Marple", "MARPLE", "Wolfe", "Nero"):
        assert word not in text, word
    report = outcome.report
    assert {q["path"] for q in report["quarantined"]} >= {
        "PHI/(shaped like a person's name, not shown)",
        "scans/(shaped like a person's name, not shown)/bad.dcm",
    }
    assert report["aliases"], "the second name is listed, masked"


def test_a_walk_error_of_a_phi_folder_does_not_name_a_name_shaped_file(landing):
    folder = landing.write(BatchSpec(BATCH, images=good_images(), collection=COLLECTION))
    (folder / "PHI").mkdir()
    (folder / "PHI" / "Doe^John.dcm").symlink_to("nowhere.dcm")  # dangling: the batch fails
    outcome = landing.process(BATCH)
    assert outcome.plan.status == "ERROR"
    assert "Doe" not in outcome.plan.error
    assert "PHI/(shaped like a person's name, not shown)" in outcome.plan.error
