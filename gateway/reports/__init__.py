"""Reports and alert delivery (issue #6): the monthly log review and the incident flash
report (``kanmon report ...``, HTML with embedded charts), and the gateway's own alerts to a
webhook / by mail (alerting.py).

Layout: recordview (facts of one record) -> review / incident (pure aggregation into the
dataclasses of model) -> html + charts (rendering) ; sources (reading logs and policy,
writing files) and commands (CLI) are the I/O edges."""
