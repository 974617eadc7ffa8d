"""Config schema of the shared registry (`registry:` in the gateway config)."""

REGISTRY_SCHEMA = {
    # config.py: "registry": REGISTRY_SCHEMA  (absent: the embedded SQLite registry)
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {"url": {"type": "string", "pattern": "^postgres(ql)?://"}},
}


# -- user sign-in sessions in the shared registry (issue #9 on several nodes) -------------------
# Versioned like gateway/registry/postgres.py MIGRATIONS (entry N applied once, in one transaction,
# never edited once released; append a new one), but counted in their own table
# (kanmon_schema_sessions) so the registry's own numbering stays free for its next migration.
# Applied by gateway/signin/store_pg.py after the registry's (it writes into the `audit` outbox).
# Each statement is idempotent, so this list can later be folded into MIGRATIONS unchanged.
SESSION_MIGRATIONS: list[str] = [
    # 1: one row per sign-in (as gateway/signin/store.py in SQLite) and the session revision: one
    # counter row that every writer updates in its own transaction, so writers serialize on it,
    # the commit order is the revision order and a reader never sees a revision whose rows are
    # not yet committed (a sequence moves at nextval(), before commit, so a poller could skip).
    """
    CREATE TABLE IF NOT EXISTS user_sessions (
        session_id text PRIMARY KEY,
        device_id text NOT NULL,
        tunnel_ip text NOT NULL,
        user_name text NOT NULL,
        subject text NOT NULL,
        issuer text NOT NULL,
        email text,
        groups text[] NOT NULL DEFAULT '{}',
        amr text[] NOT NULL DEFAULT '{}',
        acr text,
        mfa boolean NOT NULL DEFAULT false,
        auth_time timestamptz,
        created_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        ended_at timestamptz,
        end_reason text NOT NULL DEFAULT '',
        rev bigint NOT NULL
    );
    CREATE INDEX IF NOT EXISTS user_sessions_live_user ON user_sessions (user_name) WHERE ended_at IS NULL;
    CREATE INDEX IF NOT EXISTS user_sessions_live_device ON user_sessions (device_id) WHERE ended_at IS NULL;
    CREATE INDEX IF NOT EXISTS user_sessions_live_expiry ON user_sessions (expires_at) WHERE ended_at IS NULL;
    CREATE INDEX IF NOT EXISTS user_sessions_user ON user_sessions (user_name, created_at);
    CREATE TABLE IF NOT EXISTS user_sessions_revision (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        value bigint NOT NULL
    );
    INSERT INTO user_sessions_revision VALUES (true, 0) ON CONFLICT DO NOTHING;
    """,
]
