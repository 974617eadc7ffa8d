"""Category-feed subscriptions (issue #17): domain lists fetched from a URL or a local path
(UT1 layout, hosts files, plain domain lists, adblock-style lists), verified, checked for
sanity, kept as a last good copy under the state dir, and compiled into the policy like a
list file.

Pure parts: ``formats`` (feed text -> entries), ``checks`` (integrity and sanity),
``spec`` (the policy declaration). I/O at the edges: ``fetch``, ``store``, ``update``,
``commands`` (`kanmon lists ...`)."""
