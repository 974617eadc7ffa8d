"""Automatic quarantine (issue #18): triggers (a virus in a download or in received mail, a
category hit, N blocks of a category within M minutes) and the service that quarantines the
device through the registry, off the event loop, and alerts the operator."""
