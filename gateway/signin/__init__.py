"""User sign-in on top of device authentication (issue #9).

The device certificate and the WireGuard key prove which device it is; this package proves
who holds it: OpenID Connect sign-in (authorization code + PKCE) at the organization's
identity provider, a session bound to the device and its tunnel address, and the user's
identity and authentication methods handed to policy and logs.

Pipeline: tunnel identity -> device record -> ``SessionDirectory`` (this package) ->
``DeviceContext`` with the user -> policy verdict. The captive portal and gate are in
``addons/signin.py``; the IdP conversation in ``oidc.py``.
"""
