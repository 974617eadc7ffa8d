"""The keys of the per-flow state the addons share (``flow.metadata``), owned here so that no
addon imports another one to read what it wrote. What belongs to the whole connection (the
device, the verdicts so far, the protocol, the TLS verdict) is typed in
gateway/proxy/connections.py (``ConnectionState``)."""

METADATA_DEVICE = "kanmon.device"             # DeviceRecord | None, set by addons/identity.py
METADATA_TARGET = "kanmon.request_target"     # (host, url) the upstream will see: addons/requesttarget.py
METADATA_VERDICT = "kanmon.verdict"           # the flow's Verdict, combined by addons/flowverdict.py
METADATA_DEFERRED = "kanmon.deferred"         # a policy decision deferred to a later hook (addons/policy.py)
METADATA_DNS_BLOCK = "kanmon.dns_block"       # "nxdomain" | "sinkhole" for a DNS-stage block (addons/policy.py)
METADATA_SESSION = "kanmon.session"           # the signed-in user's session (addons/signin.py)
METADATA_SIGNATURE = "kanmon.virus_signature"  # the virus signature an infected page names (addons/scan.py)
METADATA_REQUEST_ID = "kanmon.request_id"     # the id a block page shows (addons/enforce.py)
