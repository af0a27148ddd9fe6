"""The driver's client of the SPIRE agent's Delegated Identity API."""
