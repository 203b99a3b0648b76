"""The worker's main process: the ``Task.Strategy`` hook and the consumer bootstep
(:mod:`.strategy`), the waiting lines and admission (:mod:`.gate`), the slot's release on every
end path (:mod:`.endpaths`) and the outcomes of tasks that never run (:mod:`.outcomes`)."""
