"""CompletedBatchSensor: waits for anonymization batches that are complete in the run's interval.

Reschedule mode by default: no worker slot is held while waiting, and no custom trigger is
needed (Cloud Composer 3 cannot load triggers from plugins/).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue


class CompletedBatchSensor(BaseSensorOperator):
    """Succeeds with the ids of the batches this run owns.

    - ``batch_ids`` given (a manual run's conf): exactly those, whatever their dates.
    - A scheduled or backfill run: batches whose ``completed_at`` lies in the data interval.
      If none has appeared by ``timeout`` after the interval's end, the run ends skipped; a
      backfill of a past interval therefore skips at once rather than waiting.
    - A manual run without ids: every complete batch that has no report yet; none: skipped at once.

    Settings are validated at the first poke, so a run with missing settings fails at once
    with a message that names them.
    """

    template_fields: Sequence[str] = ("landing_root", "batch_ids")
    ui_color = "#fdf6e3"

    def __init__(
        self,
        *,
        landing_root: str | None = None,
        batch_ids: list[str] | str | None = None,
        gcp_conn_id: str = "google_cloud_default",
        impersonation_chain: str | None = None,
        mode: str = "reschedule",
        poke_interval: float = 300,
        timeout: float = 6 * 3600,
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, poke_interval=poke_interval, timeout=timeout, soft_fail=True, **kwargs)
        self.landing_root = landing_root
        self.batch_ids = batch_ids
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain

    def poke(self, context: Context) -> PokeReturnValue:
        from airflow.sdk.exceptions import AirflowSkipException

        from dicom_archive.plan import find_completed_batches, find_unreported_batches
        from hooks.dicom_storage import DicomStorageHook, load_settings

        settings = load_settings()
        root = self.landing_root or settings.landing_root
        hook = DicomStorageHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        with hook.explain_google_errors(f"the landing zone {root}"):
            zone = hook.landing_zone(settings, root)
            requested = self._requested_ids()
            if requested:
                return PokeReturnValue(is_done=True, xcom_value=requested)

            run_type = getattr(context["dag_run"], "run_type", None)
            if getattr(run_type, "value", run_type) == "manual":  # an enum in a real run
                pending = find_unreported_batches(zone)
                self.log.info("manual run without batch_ids: %d unreported batches", len(pending))
                if not pending:  # a manual run asks about now: nothing to wait for
                    raise AirflowSkipException(f"no complete batch without a report under {zone.uri}")
                return PokeReturnValue(is_done=True, xcom_value=pending)

            start, end = context["data_interval_start"], context["data_interval_end"]
            found = find_completed_batches(zone, start, end, settings.default_collection)
        self.log.info("%d completed batches in [%s, %s) under %s", len(found), start, end, zone.uri)
        if found:
            return PokeReturnValue(is_done=True, xcom_value=found)
        if datetime.now(UTC) >= end + timedelta(seconds=self.timeout):
            raise AirflowSkipException(f"no batch completed in [{start}, {end}) under {zone.uri}")
        return PokeReturnValue(is_done=False)

    def _requested_ids(self) -> list[str]:
        ids = self.batch_ids
        if isinstance(ids, str):
            ids = [part.strip() for part in ids.split(",")]
        return sorted({i for i in ids or [] if i})
