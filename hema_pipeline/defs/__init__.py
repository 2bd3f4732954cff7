"""The Dagster skin: thin asset, check, sensor and schedule definitions over the domain packages."""
