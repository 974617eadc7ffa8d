"""Device identity for Kanmon: the organization device CA and trusted external CAs
(ca.py), the WireGuard-key binding (binding.py), the pure certificate check used by
enrollment and re-validation (certcheck.py), phone-ready client configs (clientconfig.py)
and the `kanmon ca` CLI group (commands.py)."""
