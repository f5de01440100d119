"""DicomStudyArchiveOperator: verified, deterministic, streamed study archives."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import Context

from operators.assets import ARCHIVES_ALIAS, archive_prefix_asset
from operators.destination import DicomStorageBaseOperator
from operators.failures import fail_at_once_on_permanent_errors
from operators.links import BatchReportLink, CollectionArchivesLink, record_links

if TYPE_CHECKING:
    from dicom_archive.batch import Staging
    from dicom_archive.plan import StudyGroup
    from dicom_archive.stores import ObjectStore


class DicomStudyArchiveOperator(DicomStorageBaseOperator):
    """Archive study groups: check, tar, gzip and upload each in one pass, then stage the rows.

    :param study_groups: one or a list of study groups (``StudyGroup.to_dict()``), or a chunk
        reference from the plan step, ``{"batch_id", "run_key", "start", "stop"}`` (the form
        that task mapping uses, so XCom stays small whatever the batch size).
    :param landing_root: the landing zone; default: the DICOM_LANDING_ROOT setting.
    :param deid: de-identification provenance for the rows, when groups are given inline.
    :param bucket, project, gcp_conn_id, impersonation_chain: see DicomStorageBaseOperator.

    Returns one small summary per archive: uri, generation, md5, crc32c, size, image count,
    quarantined count, outcome (written / already_present / replaced / superseded). The per-image rows go to
    the batch's staging folder for the BigQuery step, not to XCom.
    """

    template_fields: Sequence[str] = ("study_groups", "landing_root", "deid", *DicomStorageBaseOperator.template_fields)
    destination_fields: ClassVar[Mapping[str, str]] = {
        **DicomStorageBaseOperator.destination_fields,
        "landing_root": "landing_root",
    }
    operator_extra_links = (CollectionArchivesLink(), BatchReportLink())
    ui_color = "#e8f4fd"

    def __init__(
        self,
        *,
        study_groups: dict[str, Any] | list[dict[str, Any]],
        landing_root: str | None = None,
        deid: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("outlets", [ARCHIVES_ALIAS])
        super().__init__(**kwargs)
        self.study_groups = study_groups
        self.landing_root = landing_root
        self.deid = deid
        self.console_links: dict[str, str] = {}

    def execute(self, context: Context) -> list[dict[str, Any]]:
        with fail_at_once_on_permanent_errors():
            return self._archive(context)

    def _archive(self, context: Context) -> list[dict[str, Any]]:
        # Imported here, not at module level, so that parsing the DAG stays fast.
        from dicom_archive.batch import archive_groups_spooled, wrote
        from dicom_archive.ndjson import NdjsonSpool
        from dicom_archive.rows import RunContext

        settings = self.destination_settings()
        hook = self.storage_hook()
        store = hook.archive_store(settings)
        zone = hook.landing_zone(settings)
        run_context = RunContext(
            upload_agent=f"airflow:{self.dag_id}.{self.task_id}",
            dag_run_id=context["run_id"],
        )
        refs = self.study_groups if isinstance(self.study_groups, list) else [self.study_groups]
        summaries: list[dict[str, Any]] = []
        with hook.explain_google_errors(f"the staged plans under {store.uri('_staging/')}"):
            work = self._resolve(refs, store, context["run_id"])
        for staging, chunk, groups, deid in work:
            groups = self._drop_withdrawn(groups, store)
            if not groups:
                continue
            self.log.info("batch %s: archiving %d studies (chunk %s)", staging.batch_id, len(groups), chunk)
            resource = store.uri(groups[0].object_name.rsplit("/Entity/", 1)[0])
            # The rows wait in a temporary file, not in memory, until they are staged.
            with hook.explain_google_errors(resource), NdjsonSpool() as rows:
                chunk_summaries = archive_groups_spooled(
                    groups,
                    zone,
                    store,
                    rows=rows,
                    deid=deid,
                    context=run_context,
                    settings=settings.archive,
                    progress=self._log_progress,
                )
                staging.write_chunk(chunk, chunk_summaries, rows)
            summaries.extend(chunk_summaries)
            collection = groups[0].collection
            record_links(self, settings, collection=collection, batch_id=staging.batch_id)
            if settings.send_to_google:
                context["outlet_events"][ARCHIVES_ALIAS].add(
                    archive_prefix_asset(settings.bucket, collection),
                    extra={
                        "batch_id": staging.batch_id,
                        "archives": len(chunk_summaries),
                        "written": sum(wrote(s) for s in chunk_summaries),
                        "replaced": sum(s["outcome"] == "replaced" for s in chunk_summaries),
                        "superseded": sum(s["outcome"] == "superseded" for s in chunk_summaries),
                    },
                )
            for summary in chunk_summaries:
                if summary["outcome"] == "replaced":
                    self.log.info(
                        "replaced %s: %s images before, %s after",
                        summary["uri"],
                        summary.get("images_before", "?"),
                        summary["image_count"],
                    )
                elif summary["outcome"] == "superseded":
                    self.log.warning(
                        "left %s alone: batch %s, completed %s (after this batch), holds the study with %s "
                        "images; this batch's %s images of it are neither archived nor loaded",
                        summary["uri"],
                        summary.get("newer_batch", "?"),
                        summary.get("newer_completed_at", "?"),
                        summary.get("images_in_archive", "?"),
                        summary["image_count"],
                    )
        return summaries

    def _drop_withdrawn(self, groups: list[StudyGroup], store: ObjectStore) -> list[StudyGroup]:
        """Studies withdrawn since the plan was made are not archived (the plan step holds back
        those withdrawn before it, as quarantine reason `withdrawn`)."""
        from dicom_archive.withdraw import WithdrawnIndex

        if not groups:
            return groups
        index = WithdrawnIndex.load(store, groups[0].collection)
        if not index.names:
            return groups
        kept = [g for g in groups if index.withdrawn_by(g.entity_id, g.item_id) is None]
        if len(kept) != len(groups):
            self.log.warning(
                "%d studies of this chunk were withdrawn since planning: not archived", len(groups) - len(kept)
            )
        return kept

    def _resolve(
        self, refs: list[dict[str, Any]], store: ObjectStore, run_id: str
    ) -> list[tuple[Staging, str, list[StudyGroup], dict[str, Any]]]:
        """Chunk references are read from their own staged chunk plan (never the whole batch's
        plan); inline groups are taken as they are."""
        from dicom_archive.batch import Staging, run_key
        from dicom_archive.plan import StudyGroup

        resolved = []
        inline: list[StudyGroup] = []
        for ref in refs:
            if "start" in ref:
                staging = Staging(store, ref["batch_id"], ref["run_key"])
                chunk = staging.read_chunk_plan(ref)
                resolved.append((staging, chunk.chunk_id, chunk.groups, chunk.deid))
            else:
                inline.append(StudyGroup.from_dict(ref))
        for batch_id in sorted({g.batch_id for g in inline}):
            groups = [g for g in inline if g.batch_id == batch_id]
            digest = hashlib.sha1("\n".join(sorted(g.stem for g in groups)).encode()).hexdigest()[:16]
            resolved.append((Staging(store, batch_id, run_key(run_id)), f"inline-{digest}", groups, self.deid or {}))
        return resolved

    def _log_progress(self, done: int, total: int, done_bytes: int, seconds: float) -> None:
        rate = done_bytes / 1e6 / seconds if seconds > 0 else 0.0
        self.log.info("studies %d/%d, %.1f MB read, %.1f MB/s", done, total, done_bytes / 1e6, rate)
