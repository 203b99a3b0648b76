"""What runs where the task runs (a pool process, a pool thread, or the solo main thread): the
run itself (:mod:`.execution`), timeouts where Celery has none (:mod:`.timeouts`), and the
backend that writes envelopes (:mod:`.backend`)."""
