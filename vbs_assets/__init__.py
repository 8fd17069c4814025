"""Assets, asset checks, partitions and jobs of vbs, with the plain code under them
(validation, the batch runner)."""
