"""The operator console (issue #21): the IT section's daily work in a browser.

ARCHITECTURE
============

Stack: Flask 3.1 (WSGI, already installed with mitmproxy) + Jinja2 templates (autoescaped,
StrictUndefined) + plain HTML forms; no JavaScript build, no inline script (the Content
Security Policy forbids it), one stylesheet (``static/console.css``). Every sentence is a
gettext message of the console's own catalog (``locale/ja/LC_MESSAGES/console.po``,
compiled in memory by ``gateway.pages.catalog.compile_po``, as the staff pages' catalog is).

Process: ``kanmon console serve --config FILE`` (``gateway/console/serve.py``), its own
process beside the gateway (why: see serve.py), HTTPS on the management address with a
certificate of the organization CA.

Modules
-------
- ``app.py``      ``create_app(cfg, services)``: the Flask app; security headers; the
                  blueprint list ``PAGES``; the error pages (403/404/400, bilingual).
- ``auth.py``     server-side sessions (``SessionStore``), the operator of the request
                  (``current_operator()`` -> ``Operator``), ``requires_role(...)``, CSRF
                  (``csrf_token()`` in templates; checked for every POST before any view
                  runs, with the Origin / Sec-Fetch-Site check).
- ``signin.py``   /signin, /callback, /signout: OIDC through the gateway's client
                  (gateway/signin/oidc.py), MFA decided by gateway.signin.sessions.
- ``audit.py``    ``audit(action, outcome, reason, **fields)``: a console action (with the
                  operator's IdP identity) into the tamper-evident ``audit`` log stream;
                  ``actor()``: the name written into registry audit entries.
- ``catalog.py``  the console's translations; ``lang()`` of the request.
- ``devices.py``  devices list, a device's page, register + QR, lifecycle actions.
- ``selfservice.py`` "my devices" and the loss report.

How to add a page
-----------------
1. A module ``gateway/console/NAME.py`` with ``bp = Blueprint("NAME", __name__)`` and views::

       from gateway.console.auth import requires_role, current_operator
       from gateway.console.app import render_page

       @bp.get("/policy")
       @requires_role("admin", "auditor")          # admin passes every requires_role
       def policy():
           return render_page("policy.html", title_msgid="Policy", ...)

   ``requires_role`` is mandatory on every view (tests/unit/test_console_auth.py walks the
   URL map and fails for a view without it). For POST views use ``requires_role("admin")``
   or ``("admin", "helpdesk")``: an auditor never passes a POST (refused in ``auth`` for
   every unsafe method, whatever the decorator says).
2. Add ``("gateway.console.NAME", NavItem(...))`` to ``PAGES`` in ``app.py`` (one line; the
   nav shows the item to the roles it names).
3. Templates ``templates/NAME.html`` extend ``base.html`` (``{% block content %}``); use
   ``{{ _("English text") }}`` for every sentence, ``{{ csrf_field() }}`` inside every
   ``<form method="post">``. Then add the messages to ``locale/ja/LC_MESSAGES/console.po``
   (``pybabel extract -F gateway/console/babel.cfg -o /tmp/c.pot gateway/console`` and
   ``pybabel update -i /tmp/c.pot -d gateway/console/locale -D console -l ja``);
   tests/unit/test_console_catalog.py fails until each has its Japanese text.
4. Write changes to the audit trail: device changes go through gateway/runtime/lifecycle.py
   with ``actor=audit.actor()``; any other change calls ``audit.audit(...)``.
5. Test with the fixtures of tests/unit/console_fixtures.py (``signed_in(client, role)``).

Python code in this package must not call ``_``/``N_``/``both`` with a literal (the staff
pages' catalog test extracts those from every gateway/**.py into *its* catalog): mark messages
in code with ``M_`` from catalog.py and translate them where shown (``gettext_for(g.lang)``).
Bilingual texts that are not page messages (errors of the lifecycle, of the CA) are
``gateway.i18n.Text``; show them with ``.render()``.

Helpers in short: ``auth.current_operator()`` (``.actor``, ``.roles``, ``.has(role)``,
``.read_only``), ``auth.requires_role(...)``, ``auth.services()`` (``.cfg``, ``.registry``,
``.apply_now``), ``auth.refuse(kind, detail)`` (403 + audit), ``audit.audit(action, reason=...)``,
``app.render_page(template, status, **context)``, ``csrf_field()`` in templates, the notices
of devices.py (``_notice``/``_take_notices``) for a message on the next page. Views that need no
sign-in (rare) go into ``app.UNGUARDED``.
"""
