"""flows: Prefect flows and tasks of ctfactory, plus the ``ctfactory`` command line."""
