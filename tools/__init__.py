"""Tools and test helpers: the tiny offline model (`slurmserve tiny-model`, the examples, the tests)
and LocalDeployment, which runs `slurmserve serve` as a subprocess for the tests and benchmarks.
Neither imports the rest of slurmserve."""
