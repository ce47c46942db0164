"""Training machinery shared by every technique: optimizer groups and schedules (``optim``) and
exact chunked gradient accumulation (``grad_cache``), logging of values already identical on
every rank (``gathered_log``)."""
