"""The DICOM receiver: a C-STORE SCP (pynetdicom) that puts each instance into the spool.

It accepts every storage SOP class in every transfer syntax pynetdicom knows, answers
C-ECHO, and acknowledges an instance only once the spool has it on disk
(:meth:`asyncflow.listen.spool.Spool.store`). An instance the spool's budget cannot take is
answered 0xA700 (Out of Resources), one that cannot be written 0xA701 (Out of Resources:
unable to store): the sender keeps it and tries later, nothing is lost. ``on_series`` is
called with each series' first instance and ``on_release`` when an association ends (from
pynetdicom's threads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from asyncflow.listen.spool import Spool, SpoolFull
from asyncflow.log import get_logger

__all__ = ["OUT_OF_RESOURCES", "Receiver"]

OUT_OF_RESOURCES, CANNOT_STORE = 0xA700, 0xA701
_INVALID = 0xC210  # Cannot understand: not the dataset of a storage request

log = get_logger(__name__)


class Receiver:
    """A C-STORE SCP on ``host``:``port`` as ``ae_title`` (callers limited to ``callers`` when given)."""

    def __init__(
        self,
        spool: Spool,
        ae_title: str,
        host: str,
        port: int,
        *,
        callers: Sequence[str] = (),
        on_series: Callable[[str, int, str], None] | None = None,
        on_release: Callable[[int], None] | None = None,
    ) -> None:
        self.spool, self.ae_title, self.host, self.port = spool, ae_title, host, port
        self.callers, self.on_series, self.on_release = tuple(callers), on_series, on_release
        self.refused = 0  # instances answered Out of Resources
        self._full = False  # refusing since the last instance stored
        self._server: Any = None

    def start(self) -> None:
        """Listen (pynetdicom's threads); returns at once."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = 16
        if self.callers:
            ae.require_calling_aet = list(self.callers)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_RELEASED, self._ended),
            (evt.EVT_ABORTED, self._ended),
        ]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])  # port 0: the one the system chose

    def stop(self) -> None:
        """Stop listening; associations in progress are aborted (their senders keep what was
        not acknowledged)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _store(self, event: Any) -> int:
        try:
            dataset = event.dataset
            series, sop = str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a dataset it cannot read: refused, not a crash
            log.warning("series.refused", error_type=type(exc).__name__, status=f"0x{_INVALID:04X}")
            return _INVALID
        association = id(event.assoc)
        try:
            first = self.spool.store(series, sop, data, association)
        except SpoolFull as exc:
            self.refused += 1
            if not self._full:
                self._full = True
                log.warning("spool.full", reason=str(exc), status=f"0x{OUT_OF_RESOURCES:04X}")
            return OUT_OF_RESOURCES
        except OSError as exc:
            log.warning("series.refused", error_type=type(exc).__name__, status=f"0x{CANNOT_STORE:04X}")
            return CANNOT_STORE
        self._full = False
        if first and self.on_series is not None:
            self.on_series(series, association, str(event.assoc.requestor.ae_title).strip())
        return 0x0000

    def _ended(self, event: Any) -> None:
        if self.on_release is not None:
            self.on_release(id(event.assoc))
