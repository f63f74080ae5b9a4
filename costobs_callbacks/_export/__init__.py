"""Export: the ledger's finished spans to the store, off the app's thread, and nothing lost while the database
is away.

The data flow, module by module: ``worker`` (``BatchExporter``: a bounded queue, one thread writing batches to
the sink, retries, bisection of a ``PoisonBatch``) -> the sink (``Store.write_batch``) or, while the database
does not take writes, the ``Fallback`` (``sink``: what the worker asks of both, and the ``Batch`` it hands them,
whose id makes the store apply it once) -> ``fallback`` (``StoreSpool``: batches as the store's rows, replayed in
order) -> ``spool`` (one locked append-only file per process, taken over from processes gone) of ``records``
(checksummed, self-delimiting); ``watchdog`` cuts a PostgreSQL call that hangs.
"""

from .fallback import StoreSpool, dump_rows, file_identity, load_batch, load_rows, sqlite_path
from .records import SpoolRecord, encode, read_records
from .sink import Batch, Fallback, PoisonBatch, new_batch_id
from .spool import Spool, default_spool_dir
from .watchdog import Watchdog
from .worker import BatchExporter, ExportStats

__all__ = [
    "Batch", "BatchExporter", "ExportStats", "Fallback", "PoisonBatch", "Spool", "SpoolRecord", "StoreSpool",
    "Watchdog", "default_spool_dir", "dump_rows", "encode", "file_identity", "load_batch", "load_rows",
    "new_batch_id", "read_records", "sqlite_path",
]
