"""Kanmon's mitmproxy addons, one concern each. The chain, in order, is assembled by
`gateway.proxy.build_addon_chain`: identity -> decisions -> extra -> enforcer -> logging."""
