"""The async runtime: ``await runtime.submit(inputs, adapter)`` from any number of coroutines.

The event loop never blocks: file reads happen in the store's worker threads, the forward pass
and every device synchronisation happen in the worker thread.
"""

from ._facade import Runtime, RuntimeConfig, RuntimeStatistics, StreamResult, default_select_output

__all__ = ["Runtime", "RuntimeConfig", "RuntimeStatistics", "StreamResult", "default_select_output"]
