"""Settings of the outputs spec, read from the environment or any other lookup (Airflow Variables).

The original pipeline's names stay; the DICOM_* names are this project's additions. Importing this
module stays light (no pydicom, isal or Google client): hooks, sensors and DAG files import it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_archive.deid_gate import (
    DEFAULT_PERSON_ATTRIBUTES,
    DEID_PROFILES,
    PRIVATE_TAGS_MODES,
    DeidPolicy,
    PrivateAllow,
    is_dicom_keyword,
)
from dicom_archive.naming import bucket_name_problem, collection_problem

# The header fields a row keeps (DicomHeader): de-identified, non-identifying technical and
# descriptive fields. A site can pass its own list (DICOM_HEADER_ALLOW_LIST).
DEFAULT_HEADER_ALLOW_LIST: tuple[str, ...] = (
    "Modality", "StudyDescription", "SeriesDescription", "BodyPartExamined", "PatientSex", "PatientAge",
    "Manufacturer", "ManufacturerModelName", "ImageType", "SOPClassUID", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PhotometricInterpretation",
    "SamplesPerPixel", "NumberOfFrames", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "ImageOrientationPatient", "ImagePositionPatient", "SliceLocation", "PatientPosition",
    "SeriesNumber", "InstanceNumber", "AcquisitionNumber", "KVP", "ExposureTime", "XRayTubeCurrent",
    "Exposure", "ConvolutionKernel", "ScanOptions", "CTDIvol", "ContrastBolusAgent", "ProtocolName",
    "MagneticFieldStrength", "EchoTime", "RepetitionTime", "InversionTime", "FlipAngle",
    "SequenceName", "ScanningSequence", "MRAcquisitionType", "WindowCenter", "WindowWidth",
    "RescaleIntercept", "RescaleSlope", "LossyImageCompression", "BurnedInAnnotation",
    "PatientIdentityRemoved", "DeidentificationMethod",
)  # fmt: skip

Lookup = Callable[[str], str | None]

DEFAULT_COMPRESSLEVEL = 1  # DICOM_GZIP_LEVEL; python-isal's levels are 0 to 3
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


def default_local_output() -> str:
    """DICOM_LOCAL_OUTPUT when unset: `dicom_output` in the Airflow home, which Airflow can write."""
    return os.path.join(os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow"), "dicom_output")


class SettingsError(ValueError):
    """What is missing or wrong, all at once."""


def _bool(name: str, value: str | None, default: bool, problems: list[str]) -> bool:
    if value is None:
        return default
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    problems.append(f"{name} must be true or false, not {value!r}")
    return default


def _int(name: str, value: str | None, default: int, low: int, high: int, problems: list[str]) -> int:
    if value is None or value.strip() == "":
        return default
    try:
        number = int(value)
    except ValueError:
        problems.append(f"{name} must be a whole number, not {value!r}")
        return default
    if not low <= number <= high:
        problems.append(f"{name} must be between {low} and {high}, not {number}")
    return number


def _names(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None or not value.strip():
        return default
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _keywords(name: str, value: str | None, default: tuple[str, ...], problems: list[str]) -> tuple[str, ...]:
    """A comma list of DICOM keywords; a name pydicom's dictionary does not know is a typo that
    would switch a check off without a word, so it fails the settings check, named."""
    names = _names(value, default)
    unknown = [n for n in names if not is_dicom_keyword(n)]
    if unknown:
        problems.append(f"{name}: not DICOM keywords (a typo?): {', '.join(unknown)}")
    return names


def _header_allow_list(value: str | None, problems: list[str]) -> tuple[str, ...]:
    """The header fields rows carry (DicomHeader). Beyond the default list, none that the PS3.15 Basic
    Profile counts as identifying (PatientBirthDate, PatientComments, InstitutionAddress...): the gate
    judges person names and the coded ids, not these, so rows must not carry them."""
    names = _keywords("DICOM_HEADER_ALLOW_LIST", value, DEFAULT_HEADER_ALLOW_LIST, problems)
    from dicom_archive.basic_profile import identifying  # here: importing the settings stays light

    refused = [n for n in names if n not in DEFAULT_HEADER_ALLOW_LIST and is_dicom_keyword(n) and identifying(n)]
    if refused:
        problems.append(
            "DICOM_HEADER_ALLOW_LIST: attributes PS3.15 Annex E counts as identifying never go to BigQuery: "
            + ", ".join(refused)
        )
    return names


def _service_accounts(name: str, value: str | None, problems: list[str]) -> tuple[str, ...]:
    """A comma list of service account e-mail addresses (an impersonation chain, the last one used)."""
    accounts = _names(value, ())
    bad = [a for a in accounts if a.count("@") != 1 or a.startswith("@") or a.endswith("@") or " " in a]
    if bad:
        problems.append(f"{name}: not service account e-mail addresses: {', '.join(bad)}")
    return accounts


def _choice(name: str, value: str | None, default: str, choices: tuple[str, ...], problems: list[str]) -> str:
    word = (value or "").strip().lower() or default
    if word not in choices:
        problems.append(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        return default
    return word


def _private_allow(value: str | None, problems: list[str]) -> tuple[PrivateAllow, ...]:
    """`creator:gggg,xxee` patterns, separated by `;` or new lines (a pattern holds a comma)."""
    rules = []
    for part in (value or "").replace("\n", ";").split(";"):
        if not part.strip():
            continue
        try:
            rules.append(PrivateAllow.parse(part))
        except ValueError as err:
            problems.append(f"DICOM_PRIVATE_ALLOW: {err}")
    return tuple(rules)


def _lookup_fields(value: str | None, problems: list[str]) -> tuple[str, ...]:
    """DICOM_LOOKUP_FIELDS: a comma list of plain field names lookup.json may carry besides the
    DICOM keywords. A name that is not plain, or that spells a person-name, identifier or contact
    field another way, fails the settings check, named (a setting is no PHI)."""
    from dicom_archive.manifest import declared_field_problem  # here: importing the settings stays light

    names = _names(value, ())
    for name in names:
        problem = declared_field_problem(name)
        if problem is not None:
            problems.append(f"DICOM_LOOKUP_FIELDS: {name!r} is {problem}")
    return names


def person_attributes(added: tuple[str, ...], removed: tuple[str, ...], problems: list[str]) -> tuple[str, ...]:
    """The default list (the contract's and the contact attributes of deid_gate), plus
    DICOM_PERSON_ATTRIBUTES, less DICOM_PERSON_ATTRIBUTES_REMOVED (which may name only defaults:
    removing is never done by leaving a name out)."""
    not_defaults = [n for n in removed if n not in DEFAULT_PERSON_ATTRIBUTES]
    if not_defaults:
        problems.append(
            "DICOM_PERSON_ATTRIBUTES_REMOVED may only name defaults of the person attribute list, not: "
            + ", ".join(not_defaults)
        )
    merged = [n for n in DEFAULT_PERSON_ATTRIBUTES if n not in removed]
    merged += [n for n in added if n not in merged and n not in removed]
    return tuple(merged)


@dataclass
class ArchiveSettings:
    """What archiving a study needs of the settings (Settings.archive)."""

    policy: DeidPolicy = field(default_factory=DeidPolicy)
    compresslevel: int = DEFAULT_COMPRESSLEVEL
    replace_changed: bool = False
    header_allow_list: tuple[str, ...] = DEFAULT_HEADER_ALLOW_LIST


@dataclass(frozen=True)
class Settings:
    send_to_google: bool
    landing_root: str
    bucket: str | None
    project: str | None
    default_collection: str | None
    local_output: str
    replace_changed: bool
    compresslevel: int
    bigquery_location: str
    studies_per_task: int
    max_archive_tasks: int  # per run; the chunk size grows beyond studies_per_task to stay under it
    person_attributes: tuple[str, ...]
    person_attributes_removed: tuple[str, ...]
    private_tags: str
    private_allow: tuple[PrivateAllow, ...]
    deid_profile: str
    header_allow_list: tuple[str, ...]
    lookup_fields: tuple[str, ...]  # DICOM_LOOKUP_FIELDS: lookup.json fields besides DICOM keywords
    max_image_mb: int
    google_retry_seconds: int  # how long the clients keep retrying transient errors
    # -- which run processes a batch (the ledger): see dicom_archive.ledger and dicom_archive.claims
    max_batches_per_run: int  # oldest completed_at first; also capped at Airflow's max_map_length
    claim_hours: int  # a run's claim on a batch; a dead run's claim can be taken over after it
    # The identity every task uses when it is given none of its own (an operator's argument wins).
    impersonation_chain: tuple[str, ...]
    # GOOGLE_APPLICATION_CREDENTIALS: a service account key file, used through the connection
    # when it names no credentials of its own (None: Application Default Credentials).
    credentials_file: str | None

    @property
    def archive(self) -> ArchiveSettings:
        """What archiving a study needs of these settings."""
        return ArchiveSettings(
            policy=self.policy,
            compresslevel=self.compresslevel,
            replace_changed=self.replace_changed,
            header_allow_list=self.header_allow_list,
        )

    @property
    def policy(self) -> DeidPolicy:
        return DeidPolicy(
            person_attributes=self.person_attributes,
            max_image_bytes=self.max_image_mb * 1024 * 1024,
            private_tags=self.private_tags,
            private_allow=self.private_allow,
            profile=self.deid_profile,
            removed_person_attributes=self.person_attributes_removed,
            lookup_fields=self.lookup_fields,
        )

    @classmethod
    def load(cls, lookup: Lookup | None = None) -> Settings:
        """Read and validate every setting; raise SettingsError naming all that is wrong."""
        get = lookup or os.environ.get
        problems: list[str] = []
        send = _bool("SEND_TO_GOOGLE", get("SEND_TO_GOOGLE"), False, problems)
        landing_root = (get("DICOM_LANDING_ROOT") or "").strip()
        bucket = (get("GOOGLE_CLOUD_STORAGE") or "").strip() or None
        project = (get("GOOGLE_PROJECT_NAME") or "").strip() or None
        collection = (get("GOOGLE_STORAGE_COLLECTION") or "").strip() or None
        local_output = (get("DICOM_LOCAL_OUTPUT") or "").strip() or default_local_output()

        if not landing_root:
            problems.append("DICOM_LANDING_ROOT is not set (a local path or gs://bucket/prefix)")
        if send:
            if not bucket:
                problems.append("GOOGLE_CLOUD_STORAGE (the bucket) is required when SEND_TO_GOOGLE=true")
            if not project:
                problems.append("GOOGLE_PROJECT_NAME (the BigQuery project) is required when SEND_TO_GOOGLE=true")
        if collection is not None and (problem := collection_problem(collection)) is not None:
            problems.append(f"GOOGLE_STORAGE_COLLECTION: {problem}")
        # Google's naming rules, checked here so that a bad name fails the run's first task with
        # the rule named, not a later one with a raw 400 or 404.
        if send and bucket and (problem := bucket_name_problem(bucket)) is not None:
            problems.append(f"GOOGLE_CLOUD_STORAGE: {problem}")
        if landing_root.startswith("gs://"):
            landing_bucket = landing_root[len("gs://") :].partition("/")[0]
            if (problem := bucket_name_problem(landing_bucket)) is not None:
                problems.append(f"DICOM_LANDING_ROOT: {problem}")

        added = _keywords("DICOM_PERSON_ATTRIBUTES", get("DICOM_PERSON_ATTRIBUTES"), (), problems)
        removed = _keywords("DICOM_PERSON_ATTRIBUTES_REMOVED", get("DICOM_PERSON_ATTRIBUTES_REMOVED"), (), problems)
        settings = cls(
            send_to_google=send,
            landing_root=landing_root,
            bucket=bucket,
            project=project,
            default_collection=collection,
            local_output=local_output,
            replace_changed=_bool(
                "DICOM_REPLACE_CHANGED_ARCHIVES", get("DICOM_REPLACE_CHANGED_ARCHIVES"), False, problems
            ),
            compresslevel=_int("DICOM_GZIP_LEVEL", get("DICOM_GZIP_LEVEL"), DEFAULT_COMPRESSLEVEL, 0, 3, problems),
            bigquery_location=(get("DICOM_BIGQUERY_LOCATION") or "US").strip(),
            studies_per_task=_int("DICOM_STUDIES_PER_TASK", get("DICOM_STUDIES_PER_TASK"), 25, 1, 10_000, problems),
            max_archive_tasks=_int(
                "DICOM_MAX_ARCHIVE_TASKS", get("DICOM_MAX_ARCHIVE_TASKS"), 512, 1, 100_000, problems
            ),
            person_attributes=person_attributes(added, removed, problems),
            person_attributes_removed=removed,
            private_tags=_choice(
                "DICOM_PRIVATE_TAGS", get("DICOM_PRIVATE_TAGS"), "strip", PRIVATE_TAGS_MODES, problems
            ),
            private_allow=_private_allow(get("DICOM_PRIVATE_ALLOW"), problems),
            deid_profile=_choice("DICOM_DEID_PROFILE", get("DICOM_DEID_PROFILE"), "contract", DEID_PROFILES, problems),
            header_allow_list=_header_allow_list(get("DICOM_HEADER_ALLOW_LIST"), problems),
            lookup_fields=_lookup_fields(get("DICOM_LOOKUP_FIELDS"), problems),
            max_image_mb=_int("DICOM_MAX_IMAGE_MB", get("DICOM_MAX_IMAGE_MB"), 4096, 1, 1_048_576, problems),
            google_retry_seconds=_int(
                "DICOM_GOOGLE_RETRY_SECONDS", get("DICOM_GOOGLE_RETRY_SECONDS"), 120, 1, 3600, problems
            ),
            max_batches_per_run=_int(
                "DICOM_MAX_BATCHES_PER_RUN", get("DICOM_MAX_BATCHES_PER_RUN"), 200, 1, 100_000, problems
            ),
            claim_hours=_int("DICOM_CLAIM_HOURS", get("DICOM_CLAIM_HOURS"), 12, 1, 24 * 30, problems),
            impersonation_chain=_service_accounts(
                "DICOM_IMPERSONATION_CHAIN", get("DICOM_IMPERSONATION_CHAIN"), problems
            ),
            credentials_file=(get("GOOGLE_APPLICATION_CREDENTIALS") or "").strip() or None,
        )
        if settings.deid_profile == "basic" and importlib.util.find_spec("dicomanonymizer") is None:
            problems.append("DICOM_DEID_PROFILE=basic needs the dicom-anonymizer package (its PS3.15 Annex E table)")
        if problems:
            raise SettingsError("Settings are incomplete: " + "; ".join(problems))
        return settings
