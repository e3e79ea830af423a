"""The async runtime: ``await runtime.submit(inputs, adapter)`` from any number of coroutines.

Data path of one request, one module per step::

    _facade     Runtime: submit() resolves the adapter (unknown id: error now); lifecycle, adapters, statistics
    _admission  submit() validates and normalises the inputs against the model
    _dispatch   the queue -> look-ahead prefetch -> when to form a batch -> results to the futures
    _scheduler  which queued requests form the next batch: a pure function of the queue
    _worker     worker thread: collate with right padding -> forward -> slice each row
    _types      RuntimeConfig, RuntimeStatistics, StreamResult and the queued Request

The event loop never blocks: file reads happen in the store's worker threads, the forward pass
and every device synchronisation happen in the worker thread.
"""

from ._facade import Runtime, RuntimeConfig, RuntimeStatistics, StreamResult, default_select_output

__all__ = ["Runtime", "RuntimeConfig", "RuntimeStatistics", "StreamResult", "default_select_output"]
