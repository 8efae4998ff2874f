"""catalog: the versioned dataset catalog of ctfactory (plain library, no Prefect)."""
