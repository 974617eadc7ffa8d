"""Config schema of the shared registry (`registry:` in the gateway config)."""

REGISTRY_SCHEMA = {
    # config.py: "registry": REGISTRY_SCHEMA  (absent: the embedded SQLite registry)
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {"url": {"type": "string", "pattern": "^postgres(ql)?://"}},
}
