"""What staff see: the block pages and the sign-in portal (issue #19).

Pages are Jinja2 templates (``templates/``, autoescaped) and every sentence on them is a
gettext message (``locale/<lang>/LC_MESSAGES/kanmon.po``, English message ids, Japanese
translations). A page shows Japanese first and English too, so both catalogs are used for
one page (``catalog.LANGUAGES``).

Updating the messages after editing a template or a ``N_()`` string::

    pybabel extract -F gateway/pages/babel.cfg -k N_ -k both -o /tmp/kanmon.pot .
    pybabel update -i /tmp/kanmon.pot -d gateway/pages/locale -D kanmon -l ja --no-fuzzy-matching

then translate the new entries; tests/unit/test_pages_catalog.py fails until every message
has its Japanese text.
"""
