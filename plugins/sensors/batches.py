"""CompletedBatchSensor: finds the batches a run processes, by the ledger of batch reports.

The published batch reports are the ledger: a run takes every complete batch without a report
whose completed_at is before the end of its data interval (a late batch goes to the next run;
downtime loses nothing), oldest first, up to DICOM_MAX_BATCHES_PER_RUN. A batch another run's
live claim holds takes no slot; a batch tried before without a report takes its turn as of its
last attempt (dicom_archive.ledger), so a failing batch never starves the others. A run with nothing
pending ends skipped at its first poke: waiting belongs to the schedule, not to a sensor that
holds a run open for hours. So it never defers, and needs no custom trigger (Cloud Composer 3
cannot load triggers from plugins/).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue

from operators.destination import GoogleDestinationMixin
from operators.failures import fail_at_once_on_permanent_errors

if TYPE_CHECKING:
    from hooks.dicom_storage import ImpersonationChain


class CompletedBatchSensor(GoogleDestinationMixin, BaseSensorOperator):
    """Succeeds with the ids of the batches this run processes; skips at once when there are none.

    - ``batch_ids`` given (a manual run's conf): exactly those, whatever their dates. Ids that
      break the contract's pattern are passed on to be refused, visibly, by the plan step (nothing
      is read or written for them); an empty id is an error, never "all".
    - A backfill run: every complete batch whose ``completed_at`` lies in its data interval,
      reported or not (a no-op where nothing changed).
    - Any other run (scheduled, manual without ids, asset-triggered): the ledger, every complete
      batch without a report completed before the end of its data interval (before now for a
      manual run).

    At most DICOM_MAX_BATCHES_PER_RUN batches (and never more than Airflow's max_map_length),
    oldest first, counting only batches no other run's live claim holds; a batch tried before
    without a report queues as of its last attempt. The log says how many wait for the next run.
    Settings are validated when the task renders its templates; a landing root that does not
    exist or cannot be read fails the run.

    :param landing_root: the landing zone; default: the DICOM_LANDING_ROOT setting.
    :param batch_ids: the ids a manual run asks for (a list, or a comma-separated string).
    :param gcp_conn_id: the Google Cloud connection.
    :param impersonation_chain: a service account to impersonate, or a chain of them.
    :param soft_fail: as for any sensor: a landing zone that cannot be read (or too many ids)
        skips the run instead of failing it. Never a bad setting: the settings are checked when
        the task renders its templates, before poking, and fail it at once.

    It decides at its first poke, so ``poke_interval`` and ``timeout`` change nothing; the other
    BaseSensorOperator arguments are passed on as given.
    """

    template_fields: Sequence[str] = ("landing_root", "batch_ids", "impersonation_chain")
    destination_fields: ClassVar[Mapping[str, str]] = {"landing_root": "landing_root"}
    ui_color = "#fdf6e3"

    def __init__(
        self,
        *,
        landing_root: str | None = None,
        batch_ids: list[str] | str | None = None,
        gcp_conn_id: str = "google_cloud_default",
        impersonation_chain: ImpersonationChain = None,
        mode: str = "reschedule",
        poke_interval: float = 60,
        timeout: float = 3600,
        **kwargs: Any,
    ) -> None:
        # soft_fail and the other sensor arguments go on in kwargs; these three are named here so
        # that the DAG's default_args can still set them.
        super().__init__(mode=mode, poke_interval=poke_interval, timeout=timeout, **kwargs)
        self.landing_root = landing_root
        self.batch_ids = batch_ids
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain

    def poke(self, context: Context) -> PokeReturnValue:
        from datetime import UTC, datetime

        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from dicom_archive.landing import LandingRootError
        from dicom_archive.ledger import check_requested, select_batches

        with fail_at_once_on_permanent_errors():  # a bad setting fails at once, soft_fail or not
            settings = self.destination_settings()  # the rendering's, read here only if not rendered
        limit = self.max_batches(settings.max_batches_per_run)
        root = settings.landing_root
        hook = self.storage_hook()
        requested = self._requested_ids()
        if requested is not None:
            try:  # as a run without ids would: otherwise each batch would fail for want of its batch.json
                with hook.explain_google_errors(f"the landing zone {root}"):
                    hook.landing_zone(settings).check_root()
            except LandingRootError as err:
                raise AirflowFailException(str(err)) from err
            valid, refused = check_requested(requested)
            for shown, problem in refused.items():
                self.log.error("refused batch id %s: %s; nothing is read or written for it", shown, problem)
            if len(requested) > limit:
                raise AirflowFailException(
                    f"{len(requested)} batch ids were given; a run takes at most {limit} (DICOM_MAX_BATCHES_PER_RUN, "
                    "and Airflow's max_map_length): split them over several runs"
                )
            # Refused ids go on to the plan step, which fails them visibly without touching anything.
            return PokeReturnValue(is_done=True, xcom_value=valid + [str(i) for i in requested if i not in valid])

        run_type = getattr(context["dag_run"], "run_type", None)
        run_type = getattr(run_type, "value", run_type)  # an enum in a real run
        start, end = context["data_interval_start"], context["data_interval_end"]
        if run_type == "manual":  # a manual run asks about now; its data interval means nothing
            start, end = None, datetime.now(UTC)
        elif run_type != "backfill":
            start = None  # the ledger: everything pending before the end of the interval
        store = hook.archive_store(settings)
        try:
            with hook.explain_google_errors(f"the landing zone {root}"):
                zone = hook.landing_zone(settings)
                selection = select_batches(
                    zone,
                    start=start,
                    end=end,
                    default_collection=settings.default_collection,
                    limit=limit,
                    local=not settings.send_to_google,
                    store=store,  # the cap is filled from batches no other run holds, fairly
                    run_id=getattr(context["dag_run"], "run_id", None),
                    explain=hook.explain_google_errors,
                )
        except LandingRootError as err:
            raise AirflowFailException(str(err)) from err
        for name, problem in sorted(selection.rejected.items()):
            self.log.warning("landing zone folder %r is not a batch: %s; it is left alone", name, problem)
        for name, problem in sorted(selection.unreadable.items()):
            dated = selection.unreadable_dated.get(name)
            when = f"dated by its batch.json's or folder's modification time, {dated.isoformat()}" if dated else "first"
            self.log.warning(
                "batch %s: its manifest cannot be read (%s); this run takes it (%s) and its plan reports the problem",
                name,
                problem,
                when,
            )
        for name, holder in sorted(selection.held.items()):
            self.log.info("batch %s: left alone, takes no slot: it is claimed by %s", name, holder)
        for name, last in sorted(selection.tried.items()):
            self.log.warning("batch %s: tried before without a report, queued as of its last attempt: %s", name, last)
        window = f"[{start}, {end})" if start is not None else f"completed before {end}"
        self.log.info("%s run, batches %s under %s: %s", run_type, window, zone.uri, selection.describe())
        if selection.deferred:
            self.log.warning(
                "%d pending batches wait for the next runs (at most %d per run, DICOM_MAX_BATCHES_PER_RUN)",
                len(selection.deferred),
                limit,
            )
        if not selection.batch_ids:
            raise AirflowSkipException(f"nothing pending {window} under {zone.uri}")
        return PokeReturnValue(is_done=True, xcom_value=selection.batch_ids)

    @staticmethod
    def max_batches(setting: int) -> int:
        """The per-run cap: the setting, within Airflow's max_map_length (each batch maps a
        load_metadata and a batch_report instance)."""
        from airflow.configuration import conf

        return max(1, min(setting, conf.getint("core", "max_map_length", fallback=1024)))

    def _requested_ids(self) -> list[object] | None:
        """The conf's ids as given (None: no ids asked for). An empty string is an id, refused."""
        ids = self.batch_ids
        if ids is None or ids == "None" or ids == []:
            return None
        if isinstance(ids, str):
            return [part.strip() for part in ids.split(",")]
        return list(ids)
