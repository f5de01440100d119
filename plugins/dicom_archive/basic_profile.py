"""DICOM_DEID_PROFILE=basic: conformance to the PS3.15 Annex E Basic Application Level
Confidentiality Profile, on a walked header.

The action table (which attribute the profile removes, empties, replaces...) is not typed here:
it comes from the `dicom-anonymizer` package, which ships it per DICOM edition; the edition is
pinned below and named in every quarantine detail. An attribute the profile removes (X) or
empties (Z, X/Z) must not hold a value, at any depth. Attributes with a dummy (D, Z/D, X/D,
X/Z/D) or UID (U) action may hold a value: a replaced one cannot be told from an original.

Exempt:
- the contract's coded identity (PatientID, AccessionNumber, StudyDate, PatientName equal to the
  coded id), which the contract replaces with pseudonyms and checks on its own;
- what the options the batch declares retain: `deid.options` in batch.json, or the codes of the
  image's DeidentificationMethodCodeSequence (CID 7050, 113100-113112). The package does not ship
  the option columns of Table E.1-1, so options are applied by VR (dates, UIDs) or by keyword
  families (device, institution, descriptors), and patient characteristics by the short list of
  that column.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Protocol

from dicom_archive.deid_gate import DeidPolicy, Reason, Verdict


class WalkedHeader(Protocol):
    """What the check needs of a walked header (header_walk.HeaderWalk, which calls this module)."""

    public_values: list[tuple[str, int, str, str, bool]]  # path, tag, dictionary VR, keyword, holds a value
    deid_codes: list[str]

    def text(self, keyword: str) -> str | None: ...


ANNEX_E_EDITION = "2026c"  # dicom-anonymizer 2.1.0: dicom_anonymization_databases.dicomfields_2026c
FORBIDDEN_CATEGORIES = ("X_TAGS", "Z_TAGS", "X_Z_TAGS")

# Table E.1-1 option codes (CID 7050) and the batch.json names for them.
OPTION_CODES: dict[str, str] = {
    "113101": "clean_pixel_data",
    "113102": "clean_recognizable_visual_features",
    "113103": "clean_graphics",
    "113104": "clean_structured_content",
    "113105": "clean_descriptors",
    "113106": "retain_longitudinal_full_dates",
    "113107": "retain_longitudinal_modified_dates",
    "113108": "retain_patient_characteristics",
    "113109": "retain_device_identity",
    "113110": "retain_uids",
    "113111": "retain_safe_private",
    "113112": "retain_institution_identity",
}
OPTION_NAMES = frozenset(OPTION_CODES.values())

CONTRACT_IDENTITY = frozenset({"PatientID", "AccessionNumber", "StudyDate", "PatientName"})

# The "Rtn. Pat. Chars. Opt." column of Table E.1-1 (the package does not ship option columns).
PATIENT_CHARACTERISTICS = frozenset(
    {
        "PatientAge", "PatientSex", "PatientSexNeutered", "PatientSize", "PatientWeight", "EthnicGroup",
        "SmokingStatus", "PregnancyStatus", "Allergies", "SpecialNeeds", "PatientState", "MedicalAlerts",
        "AdditionalPatientHistory", "PatientBreedDescription", "PatientSpeciesDescription",
    }
)  # fmt: skip
_DEVICE = re.compile(r"Device|Station|Detector|Gantry|Cassette|Plate|Manufacturer")
_DESCRIPTOR = re.compile(r"(Description|Comments?|Label|Name)$")

OptionRule = Callable[[str, str], bool]  # (keyword, VR) -> retained by the option
OPTION_RULES: dict[str, OptionRule] = {
    "retain_longitudinal_full_dates": lambda keyword, vr: vr in ("DA", "DT", "TM"),
    "retain_longitudinal_modified_dates": lambda keyword, vr: vr in ("DA", "DT", "TM"),
    "retain_uids": lambda keyword, vr: vr == "UI",
    "retain_patient_characteristics": lambda keyword, vr: keyword in PATIENT_CHARACTERISTICS,
    "retain_device_identity": lambda keyword, vr: bool(_DEVICE.search(keyword)),
    "retain_institution_identity": lambda keyword, vr: keyword.startswith("Institution"),
    "clean_descriptors": lambda keyword, vr: vr in ("LO", "SH", "LT", "ST", "UT") and bool(_DESCRIPTOR.search(keyword)),
}


@functools.cache
def _table(categories: tuple[str, ...]) -> tuple[frozenset[int], tuple[tuple[int, int, int, int], ...]]:
    """(exact tags, masked entries) of the attributes of these action categories."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    table = dicom_anonymization_database_selector(f"dicomfields_{ANNEX_E_EDITION}")
    exact: set[int] = set()
    masked: list[tuple[int, int, int, int]] = []
    for category in categories:
        for entry in table[category]:
            if len(entry) == 2:
                exact.add(entry[0] << 16 | entry[1])
            else:
                masked.append(tuple(entry))  # type: ignore[arg-type]
    return frozenset(exact), tuple(masked)


def _listed(tag: int, categories: tuple[str, ...]) -> bool:
    exact, masked = _table(categories)
    if tag in exact:
        return True
    group, element = tag >> 16, tag & 0xFFFF
    return any(
        group & group_mask == g & group_mask and element & element_mask == e & element_mask
        for g, e, group_mask, element_mask in masked
    )


def removed_or_emptied(tag: int) -> bool:
    return _listed(tag, FORBIDDEN_CATEGORIES)


def identifying(keyword: str) -> bool:
    """Whether Table E.1-1 gives the attribute any action (removes, empties, replaces or cleans it),
    UIDs aside: the contract lets those through, in typed columns."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    return tag is not None and dictionary_VR(tag) != "UI" and _listed(tag, ("ALL_TAGS",))


def declared_options(policy: DeidPolicy, image_codes: list[str]) -> set[str]:
    options = {o for o in policy.profile_options if o in OPTION_NAMES}
    options |= {OPTION_CODES[c] for c in image_codes if c in OPTION_CODES}
    return options


def check_basic_profile(walk: WalkedHeader, policy: DeidPolicy, verdict: Verdict) -> None:
    """Add a `basic_profile` failure naming every offending tag path (never a value)."""
    options = declared_options(policy, walk.deid_codes)
    rules = [OPTION_RULES[o] for o in sorted(options) if o in OPTION_RULES]
    entity_id = walk.text("PatientID")
    offenders: list[str] = []
    for path, tag, vr, keyword, filled in walk.public_values:
        if not filled or not removed_or_emptied(tag):
            continue
        if keyword in CONTRACT_IDENTITY and (keyword != "PatientName" or walk.text("PatientName") == entity_id):
            continue
        if any(rule(keyword, vr) for rule in rules):
            continue
        offenders.append(path)
    if offenders:
        listed = ", ".join(offenders[:30]) + (f" and {len(offenders) - 30} more" if len(offenders) > 30 else "")
        verdict.fail(
            Reason.BASIC_PROFILE,
            f"PS3.15 Annex E Basic Profile (DICOM {ANNEX_E_EDITION}) removes or empties: {listed}",
        )
