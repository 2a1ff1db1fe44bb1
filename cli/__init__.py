"""The ``orca`` command: run the service (``serve``, ``worker``, ``migrate``), manage keys, export examples."""
