"""GLaMM's model: the region encoder (``region``), mask losses (``losses``), the ``[SEG]``-to-SAM
bridge (``sam_bridge``), and the assembled model (``config``, ``glamm``, ``builder``)."""
